"""Reconciliation as an explicit table: observed state → action.

A reconciler looks at each thing it manages (a Slurm node and its VM, a Dask worker and its VM),
reduces what it sees to a small key — a tuple of enums such as ``(SlurmState.IDLE, VmState.MISSING)``
— and looks the key up in a table. The table *is* the behaviour: reading it tells a researcher
what happens to a node in every situation, and a test can walk it row by row.

    table = ReconcileTable(
        "slurm nodes",
        {
            (Slurm.POWERED_DOWN, Vm.MISSING): Action.NOTHING,
            (Slurm.POWERED_DOWN, Vm.ACTIVE): Action.DELETE_VM,      # an orphan: charge stops now
            ...
        },
        classify=lambda node: (node.slurm_state, node.vm_state),
    )
    for node, action in table.plan(observed):
        ...

A key missing from the table is a bug in the table, not a situation to guess about: ``plan``
raises :class:`UnhandledState` naming the key, unless the table was given a ``default``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

Observed = TypeVar("Observed")
Action = TypeVar("Action")


class UnhandledState(LookupError):
    """The reconciler saw a combination its table has no row for."""


@dataclass(frozen=True)
class ReconcileTable(Generic[Observed, Action]):
    name: str
    rows: Mapping[Hashable, Action]
    classify: Callable[[Observed], Hashable]
    default: Action | None = None

    def action_for(self, item: Observed) -> Action:
        key = self.classify(item)
        if key in self.rows:
            return self.rows[key]
        if self.default is not None:
            return self.default
        raise UnhandledState(f"{self.name}: no row for {key!r} (observed {item!r}); add one to the table")

    def plan(self, observed: Iterable[Observed]) -> list[tuple[Observed, Action]]:
        """The action for each observed item, in the order given."""
        return [(item, self.action_for(item)) for item in observed]

    def describe(self) -> list[tuple[str, str]]:
        """The table as (situation, action) text rows, for logs and documentation."""
        def text(key: Hashable) -> str:
            parts = key if isinstance(key, tuple) else (key,)
            return " + ".join(str(getattr(p, "value", p)) for p in parts)

        return [(text(k), str(getattr(a, "value", a))) for k, a in self.rows.items()]
