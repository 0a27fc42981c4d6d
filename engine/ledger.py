"""Balances per user and asset: ``available`` and ``locked``.

Every mutation goes through a method that records what changed, so the
engine can emit one BalanceUpdate per (user, asset) touched by a step, with
the absolute values after the change (consumers apply them idempotently).

Conservation: per asset, the sum over all users (the fee account included) of
available + locked always equals deposits - withdrawals. ``check`` proves it.

Standard library only.
"""

from __future__ import annotations

__all__ = ["Ledger"]


class Ledger:
    __slots__ = ("_accounts", "_net", "_touched")

    def __init__(self) -> None:
        # user -> asset -> [available, locked]; lists so a hot path mutates in place.
        self._accounts: dict[int, dict[str, list[int]]] = {}
        self._net: dict[str, int] = {}
        """Per asset: deposits - withdrawals."""
        self._touched: dict[tuple[int, str], list[int]] = {}
        """(user, asset) -> [delta_available, delta_locked] since the last ``drain``."""

    def _cell(self, user: int, asset: str) -> list[int]:
        acc = self._accounts.get(user)
        if acc is None:
            acc = self._accounts[user] = {}
        cell = acc.get(asset)
        if cell is None:
            cell = acc[asset] = [0, 0]
        return cell

    def _move(self, user: int, asset: str, d_avail: int, d_locked: int) -> None:
        cell = self._cell(user, asset)
        cell[0] += d_avail
        cell[1] += d_locked
        key = (user, asset)
        t = self._touched.get(key)
        if t is None:
            self._touched[key] = [d_avail, d_locked]
        else:
            t[0] += d_avail
            t[1] += d_locked

    def get(self, user: int, asset: str) -> tuple[int, int]:
        acc = self._accounts.get(user)
        if acc is None:
            return 0, 0
        cell = acc.get(asset)
        return (0, 0) if cell is None else (cell[0], cell[1])

    def available(self, user: int, asset: str) -> int:
        return self.get(user, asset)[0]

    def deposit(self, user: int, asset: str, amount: int) -> None:
        self._net[asset] = self._net.get(asset, 0) + amount
        self._move(user, asset, amount, 0)

    def withdraw(self, user: int, asset: str, amount: int) -> None:
        self._net[asset] = self._net.get(asset, 0) - amount
        self._move(user, asset, -amount, 0)

    def lock(self, user: int, asset: str, amount: int) -> None:
        self._move(user, asset, -amount, amount)

    def unlock(self, user: int, asset: str, amount: int) -> None:
        self._move(user, asset, amount, -amount)

    def spend_locked(self, user: int, asset: str, amount: int) -> None:
        """Amount leaves the user's locked funds (paid to a counterparty)."""
        self._move(user, asset, 0, -amount)

    def credit(self, user: int, asset: str, amount: int) -> None:
        self._move(user, asset, amount, 0)

    def drain(self) -> list[tuple[int, str, int, int, int, int]]:
        """(user, asset, available, locked, d_available, d_locked) of every cell changed
        since the last drain, in first-touched order, skipping net-zero changes."""
        out = []
        for (user, asset), (da, dl) in self._touched.items():
            if da or dl:
                avail, locked = self._accounts[user][asset]
                out.append((user, asset, avail, locked, da, dl))
        self._touched.clear()
        return out

    def check(self, expected_locked: dict[tuple[int, str], int]) -> list[str]:
        """Violations of conservation, non-negativity and lock accounting."""
        problems: list[str] = []
        totals: dict[str, int] = {}
        for user, acc in self._accounts.items():
            for asset, (avail, locked) in acc.items():
                totals[asset] = totals.get(asset, 0) + avail + locked
                if avail < 0 or locked < 0:
                    problems.append(f"user {user} {asset}: negative balance avail={avail} locked={locked}")
                want = expected_locked.get((user, asset), 0)
                if locked != want:
                    problems.append(f"user {user} {asset}: locked={locked} but open orders need {want}")
        for (user, asset), want in expected_locked.items():
            if want and self.get(user, asset)[1] == 0:
                problems.append(f"user {user} {asset}: open orders need {want} but nothing is locked")
        for asset in set(totals) | set(self._net):
            if totals.get(asset, 0) != self._net.get(asset, 0):
                problems.append(
                    f"{asset}: balances sum to {totals.get(asset, 0)} but deposits-withdrawals = "
                    f"{self._net.get(asset, 0)}"
                )
        return problems

    def snapshot(self) -> list[tuple[int, str, int, int]]:
        """Every non-empty cell, sorted: for state hashes."""
        return sorted((u, a, c[0], c[1]) for u, acc in self._accounts.items() for a, c in acc.items() if c[0] or c[1])
