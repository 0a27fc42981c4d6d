"""Balances per user and asset: ``available`` and ``locked``, one ``Cell`` each.

The engine holds on to cells (an accepted order keeps the cell of what it locks and of what its
fills pay it) and moves amounts between them directly; it emits one BalanceUpdate per cell a step
changed, with the absolute values after the step (consumers apply them idempotently), and knows
which cells a step changes without bookkeeping per move (``engine.core``). A cell, once created,
is never removed; a cell holding nothing is as good as none (``snapshot`` and ``get`` agree).

Conservation: per asset, the sum over all users (the fee account included) of
available + locked always equals deposits - withdrawals. ``check`` proves it.

Standard library only.
"""

from __future__ import annotations

__all__ = ["Cell", "Ledger"]


class Cell:
    """One user's balance of one asset."""

    __slots__ = ("asset", "available", "locked", "user")

    def __init__(self, user: int, asset: str) -> None:
        self.user = user
        self.asset = asset
        self.available = 0
        self.locked = 0


class Ledger:
    __slots__ = ("_accounts", "_net")

    def __init__(self) -> None:
        self._accounts: dict[int, dict[str, Cell]] = {}
        self._net: dict[str, int] = {}
        """Per asset: deposits - withdrawals."""

    def cell(self, user: int, asset: str) -> Cell:
        acc = self._accounts.get(user)
        if acc is None:
            acc = self._accounts[user] = {}
        cell = acc.get(asset)
        if cell is None:
            cell = acc[asset] = Cell(user, asset)
        return cell

    def get(self, user: int, asset: str) -> tuple[int, int]:
        acc = self._accounts.get(user)
        if acc is None:
            return 0, 0
        cell = acc.get(asset)
        return (0, 0) if cell is None else (cell.available, cell.locked)

    def supply(self, asset: str) -> int:
        """Deposits - withdrawals of ``asset``: the sum of every balance of it."""
        return self._net.get(asset, 0)

    def available(self, user: int, asset: str) -> int:
        return self.get(user, asset)[0]

    def deposit(self, user: int, asset: str, amount: int) -> Cell:
        self._net[asset] = self._net.get(asset, 0) + amount
        cell = self.cell(user, asset)
        cell.available += amount
        return cell

    def withdraw(self, user: int, asset: str, amount: int) -> Cell:
        self._net[asset] = self._net.get(asset, 0) - amount
        cell = self.cell(user, asset)
        cell.available -= amount
        return cell

    def check(self, expected_locked: dict[tuple[int, str], int]) -> list[str]:
        """Violations of conservation, non-negativity and lock accounting."""
        problems: list[str] = []
        totals: dict[str, int] = {}
        for user, acc in self._accounts.items():
            for asset, cell in acc.items():
                avail, locked = cell.available, cell.locked
                if (cell.user, cell.asset) != (user, asset):
                    problems.append(f"cell of user {user} {asset} says it is user {cell.user} {cell.asset}")
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
        return sorted(
            (u, a, c.available, c.locked)
            for u, acc in self._accounts.items()
            for a, c in acc.items()
            if c.available or c.locked
        )
