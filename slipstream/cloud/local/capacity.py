"""Where servers run: a small model of hypervisors, so that "No valid host" happens here as on Nova.

Jetstream2 runs out of *hosts* long before a project runs out of quota for some flavours: GPU
hosts carry four A100s each, split into vGPU slices (g3.small 1/5, g3.medium 1/4, g3.large 1/2,
g3.xl a whole GPU), and a slice must fit on one GPU; large-memory flavours only fit the few
1 TB hosts. This module answers "is there a host for this flavour now?" the way the Nova
scheduler would, from the servers that currently hold capacity (BUILD, ACTIVE, SHUTOFF: a
stopped VM keeps its host; shelved-offloaded and ERROR servers hold none).

Placement is first fit in host-name order, and on GPU hosts the fullest GPU that still fits
(packing slices keeps whole GPUs free for g3.xl). Deterministic, so tests can predict it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

from slipstream.cloud.models import Flavor
from slipstream.cloud.local.options import HostGroup

#: A GPU is split into this many units; g3.small (0.2) is 20 units, g3.medium (0.25) 25.
GPU_UNITS = 100

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


def gpu_units(flavor: Flavor) -> int:
    return round(flavor.gpus * GPU_UNITS)


@dataclass
class Host:
    name: str
    group: HostGroup
    vcpus_free: int
    ram_free_mb: int
    gpu_free: list[int] = field(default_factory=list)  # free units per GPU

    def can_host(self, flavor: Flavor) -> bool:
        return flavor.family in self.group.families

    def fit(self, flavor: Flavor) -> Placement | None:
        """Where on this host ``flavor`` would go, or None if it does not fit."""
        if not self.can_host(flavor) or flavor.vcpus > self.vcpus_free or flavor.ram_mb > self.ram_free_mb:
            return None
        need = gpu_units(flavor)
        if need == 0:
            return Placement(self.name, None)
        candidates = [(free, slot) for slot, free in enumerate(self.gpu_free) if free >= need]
        if not candidates:
            return None
        return Placement(self.name, min(candidates)[1])  # the fullest GPU that still fits

    def take(self, flavor: Flavor, slot: int | None) -> None:
        self.vcpus_free -= flavor.vcpus
        self.ram_free_mb -= flavor.ram_mb
        if slot is not None:
            self.gpu_free[slot] -= gpu_units(flavor)


@dataclass(frozen=True)
class Placement:
    host: str
    gpu_slot: int | None


def build_hosts(groups: Iterable[HostGroup], held: Iterable[tuple[str, int | None, Flavor]]) -> list[Host]:
    """The hosts with what ``held`` (host name, GPU slot, flavour of each placed server) uses."""
    hosts = [
        Host(f"{g.name}-{i}", g, g.vcpus, g.ram_mb, [GPU_UNITS] * g.gpus)
        for g in groups for i in range(1, g.count + 1)
    ]
    by_name = {h.name: h for h in hosts}
    for host_name, slot, flavor in held:
        host = by_name.get(host_name)
        if host is None:
            continue  # a host removed from the configuration: its servers keep running
        valid_slot = slot if slot is not None and 0 <= slot < len(host.gpu_free) else None
        host.take(flavor, valid_slot)
    return hosts


def place_all(hosts: list[Host], flavors: list[Flavor], never: Iterable[str] = ()) -> list[Placement] | None:
    """Places every flavour (a batch) or none: None when any one has no valid host (and
    ``hosts`` are left untouched); on success ``hosts`` are updated.

    ``never`` lists flavours or families that find no host at all (fault injection).
    """
    banned = set(never)
    trial = copy.deepcopy(hosts)  # a failed batch must leave the hosts as they were
    placements: list[Placement] = []
    for flavor in flavors:
        if flavor.name in banned or flavor.family in banned:
            return None
        for host in trial:
            spot = host.fit(flavor)
            if spot is not None:
                host.take(flavor, spot.gpu_slot)
                placements.append(spot)
                break
        else:
            return None
    for host, placed in zip(hosts, trial, strict=True):
        host.vcpus_free, host.ram_free_mb, host.gpu_free = placed.vcpus_free, placed.ram_free_mb, placed.gpu_free
    return placements


def usage(hosts: list[Host]) -> list[dict[str, object]]:
    """Per host: vCPUs, RAM and GPU share in use, for ``LocalCloud.status()``."""
    return [
        {
            "host": h.name,
            "vcpus": f"{h.group.vcpus - h.vcpus_free}/{h.group.vcpus}",
            "ram_gb": f"{(h.group.ram_mb - h.ram_free_mb) / 1024:g}/{h.group.ram_mb / 1024:g}",
            "gpus": f"{sum(GPU_UNITS - f for f in h.gpu_free) / GPU_UNITS:g}/{h.group.gpus}" if h.gpu_free else "-",
        }
        for h in hosts
    ]
