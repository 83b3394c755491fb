"""An ACCESS allocation as a Prefect block: where its SU balance comes from, a per-run budget and
the warning thresholds.

Save one in the UI (Blocks → "Slipstream Allocation") or in code, then name it in a flow's
``allocation`` parameter::

    from slipstream.blocks.allocation import AllocationBlock

    # balances you state yourself (from the ACCESS allocations portal)
    AllocationBlock(allocation_id="TRA160003", balance_gpu_su=5000, balance_cpu_su=20000,
                    run_budget_su=200).save("tra160003")

    # or Jetstream2's accounting service, found in the Keystone catalogue of a saved cloud
    AllocationBlock(allocation_id="TRA160003", balance_source="accounting-service",
                    cloud="slipstream-openstack-credentials/js2-iu", run_budget_su=200).save("tra160003-live")

    gpu_job(command="python3 train.py", flavor="g3.large", max_hours=4, allocation="tra160003")

CPU (m3), GPU (g3/g4/g5) and large-memory (r3) are separate balances on Jetstream2: a g3 plan is
held to the GPU balance. The flow refuses a plan whose worst case is over the run budget or the
balance before anything is created, and warns (Prefect events ``slipstream.budget.threshold``)
when a run has spent each threshold's share of its budget.
"""

from __future__ import annotations

import re
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from slipstream.cost.budget import CPU, GPU, LARGE_MEMORY, AccountingServiceBalances, Allocation, FixedBalances
from slipstream.cloud.errors import InvalidRequest
from slipstream.cost.watchdog import WARNING_THRESHOLDS

_ALLOCATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{1,63}$")


class AllocationBlock(Block):
    """An ACCESS allocation on Jetstream2: balances, a per-run SU budget, warning thresholds."""

    _block_type_name = "Slipstream Allocation"
    _block_type_slug = "slipstream-allocation"
    _description = (
        "An ACCESS allocation for slipstream flows: where its SU balances come from (figures you "
        "enter, or Jetstream2's accounting service), the SUs one run may spend, and when to warn."
    )
    _documentation_url = "https://docs.jetstream-cloud.org/general/access/"

    allocation_id: str = Field(
        description="The ACCESS allocation (Jetstream2 project name), e.g. TRA160003.",
    )
    balance_source: Literal["fixed", "accounting-service"] = Field(
        default="fixed",
        description="'fixed': the balances entered below. 'accounting-service': read them from "
        "Jetstream2's accounting service in the catalogue of the cloud below (12-24 h behind).",
    )
    balance_cpu_su: float | None = Field(
        default=None, ge=0, description="SUs left on Jetstream2 CPU (m3 flavours). Fixed source only.",
    )
    balance_gpu_su: float | None = Field(
        default=None, ge=0, description="SUs left on Jetstream2 GPU (g3, g4, g5 flavours). Fixed source only.",
    )
    balance_large_memory_su: float | None = Field(
        default=None, ge=0, description="SUs left on Jetstream2 Large Memory (r3 flavours). Fixed source only.",
    )
    cloud: str | None = Field(
        default=None,
        description="For 'accounting-service': the saved cloud block whose catalogue has it, "
        "e.g. slipstream-openstack-credentials/js2-iu.",
    )
    run_budget_su: float | None = Field(
        default=None, gt=0,
        description="Most SUs one run may spend. A plan whose worst case is higher is refused; a "
        "run that spends it is torn down. Empty: only the balance limits a run.",
    )
    thresholds: list[float] = Field(
        default_factory=lambda: list(WARNING_THRESHOLDS),
        description="Shares of the run budget (between 0 and 1) at which a run emits a "
        "slipstream.budget.threshold event, e.g. [0.5, 0.8, 0.9].",
    )

    @field_validator("allocation_id")
    @classmethod
    def _allocation_id_shape(cls, value: str) -> str:
        if not _ALLOCATION_ID.match(value or ""):
            raise ValueError(
                f"allocation_id {value!r} does not look like an ACCESS allocation: use the project "
                "name Horizon shows (e.g. TRA160003), letters and digits only."
            )
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds_are_shares(cls, value: list[float]) -> list[float]:
        bad = [t for t in value if not 0 < t < 1]
        if bad:
            raise ValueError(
                f"thresholds {bad} are not shares of the budget: give fractions between 0 and 1, "
                "e.g. [0.5, 0.8, 0.9] to warn at 50 %, 80 % and 90 %."
            )
        return sorted(set(value))

    @model_validator(mode="after")
    def _one_balance_source(self) -> AllocationBlock:
        figures = self._figures()
        if self.balance_source == "fixed":
            if not figures:
                raise ValueError(
                    "balance_source is 'fixed' but no balance is filled in: enter the SUs left in "
                    "balance_cpu_su, balance_gpu_su and/or balance_large_memory_su, or choose "
                    "'accounting-service'."
                )
            if self.cloud:
                raise ValueError("`cloud` is only used with balance_source 'accounting-service': clear it, or switch the source.")
        else:
            if figures:
                raise ValueError(
                    "balance_source is 'accounting-service', so the fixed balances are not used: "
                    "clear balance_*_su, or choose 'fixed'."
                )
            if not self.cloud or self.cloud == "local" or "/" not in self.cloud:
                raise ValueError(
                    "balance_source 'accounting-service' needs `cloud`: the saved OpenStack cloud "
                    "block whose catalogue has it, e.g. slipstream-openstack-credentials/js2-iu."
                )
        return self

    def _figures(self) -> dict[str, float]:
        pairs = {CPU: self.balance_cpu_su, GPU: self.balance_gpu_su, LARGE_MEMORY: self.balance_large_memory_su}
        return {r: v for r, v in pairs.items() if v is not None}

    def get_allocation(self) -> Allocation:
        """The core :class:`~slipstream.cost.budget.Allocation` (the cloud is signed in for the
        accounting service; its balances are read when the guard asks)."""
        if self.balance_source == "fixed":
            balances = FixedBalances(self._figures())
        else:
            from slipstream.blocks import load_cloud

            balances = AccountingServiceBalances(load_cloud(self.cloud))
        return Allocation(self.allocation_id, self.run_budget_su, tuple(self.thresholds), balances)


def load_allocation(ref: str) -> Allocation:
    """The allocation a flow parameter names: a saved block, as "<name>" or "slipstream-allocation/<name>"."""
    name = ref.split("/", 1)[1] if ref.startswith(f"{AllocationBlock._block_type_slug}/") else ref
    try:
        block = AllocationBlock.load(name)
    except ValueError as err:
        raise InvalidRequest(
            f"no saved allocation {ref!r}",
            hint=f"Save one first (AllocationBlock(...).save({name!r}); `prefect block ls` lists them). {err}",
        ) from None
    return block.get_allocation()
