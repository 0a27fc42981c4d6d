"""The committed configuration reference must match the settings classes."""

from __future__ import annotations

from ohs.configdoc import DOC, render


def test_configuration_doc_matches_settings_classes():
    assert DOC.exists(), "docs/configuration.md is missing: run `ohs config-doc --write`"
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `ohs config-doc --write`"


def test_every_stack_setting_is_documented():
    from stack.settings import StackSettings

    text = render()
    for name in StackSettings.model_fields:
        assert f"`OHS_{name.upper()}`" in text
