"""Token parsing and the 401/403 decisions of the API, without a server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.auth import Principal, TokenError, TokenTable, authenticate, bearer_token, decide, log_denial
from api.cli import TokenRedactor
from api.settings import ApiSettings

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
OPS = "operator-token-0123456789"


@pytest.fixture
def table() -> TokenTable:
    return TokenTable.parse({ALICE: {"user_id": 1}, BOB: {"user_id": 2}, OPS: {"role": "operator", "name": "sre"}})


def test_tokens_map_to_users_and_operators(table: TokenTable) -> None:
    assert table.lookup(ALICE) == Principal(1, "user:1")
    assert table.lookup(BOB) == Principal(2, "user:2")
    ops = table.lookup(OPS)
    assert ops is not None and ops.is_operator and ops.name == "operator:sre"
    assert len(table) == 3


@pytest.mark.parametrize("token", ["", ALICE[:-1], ALICE + "x", ALICE.upper(), " " + ALICE, "nope"])
def test_anything_but_an_exact_token_is_unknown(table: TokenTable, token: str) -> None:
    assert table.lookup(token) is None
    assert authenticate(table, token) is None


def test_no_token_authenticates_nobody(table: TokenTable) -> None:
    assert authenticate(table, None) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer {ALICE}", ALICE),
        (f"bearer {ALICE}", ALICE),
        (f"  BEARER   {ALICE}  ", ALICE),
        (f"Basic {ALICE}", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_decisions(table: TokenTable) -> None:
    alice, ops = table.lookup(ALICE), table.lookup(OPS)
    assert decide(None, 1) == 401
    assert decide(None, None) == 401
    assert decide(alice, 1) is None
    assert decide(alice, 2) == 403
    assert decide(alice, None) is None
    assert decide(ops, 1) is None and decide(ops, 2) is None and decide(ops, 2**63 - 1) is None


@pytest.mark.parametrize(
    "doc",
    [
        {"short": {"user_id": 1}},
        {" padded-token-0123456789": {"user_id": 1}},
        {ALICE: {"user_id": 0}},
        {ALICE: {"user_id": -3}},
        {ALICE: {"user_id": 2**63}},
        {ALICE: {"user_id": "1"}},
        {ALICE: {"user_id": True}},
        {ALICE: {"role": "admin"}},
        {ALICE: {"role": "operator", "user_id": 1}},
        {ALICE: {"user_id": 1, "scope": "all"}},
        {ALICE: {"user_id": 1, "name": ""}},
        {ALICE: {}},
        {ALICE: 1},
        [ALICE],
    ],
)
def test_bad_token_configuration_is_refused(doc: object) -> None:
    with pytest.raises(TokenError):
        TokenTable.parse(doc)  # type: ignore[arg-type]


def test_a_token_given_twice_must_agree() -> None:
    merged = TokenTable.parse({ALICE: {"user_id": 1}}, {ALICE: {"user_id": 1}, BOB: {"user_id": 2}})
    assert len(merged) == 2
    with pytest.raises(TokenError, match="configured twice"):
        TokenTable.parse({ALICE: {"user_id": 1}}, {ALICE: {"user_id": 2}})


def test_settings_merge_the_file_and_the_env_value(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({ALICE: {"user_id": 1}}))
    s = ApiSettings(tokens_file=path, tokens=SecretStr(json.dumps({OPS: {"role": "operator"}})))
    table = TokenTable.from_settings(s)
    assert table.lookup(ALICE) == Principal(1, "user:1")
    assert table.lookup(OPS) == Principal(None, "operator")
    assert OPS not in repr(s)  # a secret never shows in a repr or a log of the settings


def test_unreadable_token_configuration_names_no_secret(tmp_path: Path) -> None:
    with pytest.raises(TokenError) as err:
        TokenTable.from_settings(ApiSettings(tokens=SecretStr(f'{{"{ALICE}": ')))
    assert ALICE not in str(err.value)
    with pytest.raises(TokenError):
        TokenTable.from_settings(ApiSettings(tokens_file=tmp_path / "missing.json"))


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OHS_API_TOKENS", json.dumps({BOB: {"user_id": 2}}))
    assert TokenTable.from_settings(ApiSettings()).lookup(BOB) == Principal(2, "user:2")


def test_a_denial_is_logged_with_path_and_principal_never_the_token(
    table: TokenTable, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ohs.api"):
        log_denial(403, "/users/2/orders", table.lookup(ALICE), "owner user:2")
        log_denial(401, "/users/2/orders", None, "unknown token")
    lines = [r.getMessage() for r in caplog.records if r.name == "ohs.api"]
    assert lines == [
        "denied status=403 path=/users/2/orders principal=user:1 reason=owner user:2",
        "denied status=401 path=/users/2/orders principal=anonymous reason=unknown token",
    ]


def test_query_string_tokens_are_redacted_from_server_logs() -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", f"/users/1/stream?from_seq=3&token={ALICE}&x=1"), None,
    )  # fmt: skip
    assert TokenRedactor().filter(record)
    assert ALICE not in record.getMessage()
    assert "token=***&x=1" in record.getMessage()
