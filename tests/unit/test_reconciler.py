"""The reconciliation table: every observed key maps to its row's action, and a missing row is loud."""

from __future__ import annotations

from enum import StrEnum

import pytest

from slipstream.scaling.reconciler import ReconcileTable, UnhandledState


class Vm(StrEnum):
    ACTIVE = "active"
    MISSING = "missing"


class Do(StrEnum):
    NOTHING = "nothing"
    DELETE = "delete vm"


TABLE = ReconcileTable("nodes", {("down", Vm.MISSING): Do.NOTHING, ("down", Vm.ACTIVE): Do.DELETE},
                       classify=lambda n: (n[0], n[1]))


def test_each_observed_item_gets_the_action_of_its_row():
    assert TABLE.plan([("down", Vm.ACTIVE), ("down", Vm.MISSING)]) == [
        (("down", Vm.ACTIVE), Do.DELETE), (("down", Vm.MISSING), Do.NOTHING)]


def test_a_situation_without_a_row_names_the_key():
    with pytest.raises(UnhandledState, match="'up'"):
        TABLE.plan([("up", Vm.ACTIVE)])


def test_describe_reads_like_the_table():
    assert ("down + active", "delete vm") in TABLE.describe()
