"""Every knob of the LocalCloud in one object, with documented defaults, saved where all processes see it.

:class:`LocalCloudOptions` says where the cloud lives, how long VMs take to boot, the project's
quotas, which hypervisors exist (the capacity model) and which faults to inject. Passing options
to :class:`~slipstream.cloud.local.LocalCloud` writes them to ``<home>/config.json``; every other
process opening the same home (the CLI, the reaper, a flow in another terminal) reads them from
there, and picks up changes without restarting::

    from slipstream.cloud.local import LocalCloud, LocalCloudOptions, FaultOptions
    cloud = LocalCloud(options=LocalCloudOptions(
        home=Path("/tmp/lc"), boot_delay=0.2,
        faults=FaultOptions(error_rates={"create_servers": 0.1}, seed=7)))

Defaults follow Jetstream2 (``shared/research/jetstream2-facts.md`` sections 1 and 6): the
Startup/Research CPU quotas and a small lab-sized set of hosts.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slipstream.cloud.errors import InvalidRequest
from slipstream.jetstream2 import RESEARCH_QUOTAS, Quotas
from slipstream.paths import local_cloud_home

CONFIG_FILE = "config.json"

#: The provider port's operations: the names fault injection and ``api_calls`` know.
OPERATIONS: tuple[str, ...] = (
    "list_flavors", "list_images",
    "create_servers", "list_servers", "get_server", "delete_server", "stop_server",
    "start_server", "shelve_server", "unshelve_server", "console_log", "state_log",
    "create_keypair", "list_keypairs", "delete_keypair",
    "create_floating_ip", "attach_floating_ip", "list_floating_ips", "delete_floating_ip",
    "create_volume", "list_volumes", "delete_volume",
    "renew_lease",
)

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class HostGroup:
    """``count`` identical hypervisors named ``<name>-1`` ... ``<name>-<count>``.

    A server is placed on a host whose group lists its flavour family and that still has its
    vCPUs and RAM free (no overcommit, as on Jetstream2). ``gpus`` is the number of whole A100s
    per host; a vGPU flavour (g3.small = 0.2 of an A100) must fit on *one* GPU's free share.
    """

    name: str
    count: int
    vcpus: int
    ram_mb: int
    gpus: int = 0
    families: tuple[str, ...] = ("m3",)


#: A small lab: two general hosts, one large-memory host (1000 GB, for r3.*), two GPU hosts with
#: four A100s each. Jetstream2's real hosts are 128-core AMD Milan nodes (facts file, section 1).
DEFAULT_CAPACITY: tuple[HostGroup, ...] = (
    HostGroup("general", 2, vcpus=128, ram_mb=512 * 1024, families=("m3",)),
    HostGroup("large-memory", 1, vcpus=128, ram_mb=1000 * 1024, families=("r3",)),
    HostGroup("gpu", 2, vcpus=128, ram_mb=512 * 1024, gpus=4, families=("g3", "g4", "g5")),
)

#: Seconds from "created" (or "started", "unshelved") to ACTIVE, by flavour family.
DEFAULT_BOOT_DELAYS: dict[str, float] = {"m3": 1.0, "r3": 1.5, "g3": 1.5, "g4": 1.5, "g5": 1.5}


@dataclass(frozen=True)
class FaultOptions:
    """Failures to inject, for reliability tests. Everything off by default.

    - ``error_rates``: operation name (see :data:`OPERATIONS`, or ``"*"`` for all) -> chance in
      [0, 1] that a call fails with :class:`~slipstream.cloud.errors.TransientError` (an HTTP
      503) before doing anything.
    - ``seed``: seeds those draws. Draw *n* of an operation depends only on (seed, operation, n),
      with n counted in the state database, so a run is reproducible across processes.
    - ``fail_next``: operation -> number of upcoming calls that fail (a burst of 503s). Applied
      once, when these options are passed to ``LocalCloud``; :meth:`LocalCloud.fail_next` adds
      bursts at run time. The counter lives in the database, so any process's calls consume it.
    - ``extra_boot_delay``: seconds added to every boot.
    - ``slow_calls``: operation -> seconds each call of it takes before it answers (an API that
      hangs while a heartbeat renews a lease; a create call still in flight when a pool closes).
    - ``error_flavors``: flavours whose servers go to ERROR at the end of their boot.
    - ``no_capacity``: flavours or families (e.g. ``"g3"``) for which no host is ever found.
    - ``quota_recheck``: flavours or families whose batches pass the quota check when the call is
      made and fail Nova's second check (``[quota] recheck_quota``), as when another request took
      the cores in between: the call succeeds, and every server of the batch goes to ERROR with
      Nova's "Quota exceeded for cores" fault.
    """

    error_rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    fail_next: dict[str, int] = field(default_factory=dict)
    extra_boot_delay: float = 0.0
    error_flavors: tuple[str, ...] = ()
    no_capacity: tuple[str, ...] = ()
    quota_recheck: tuple[str, ...] = ()
    slow_calls: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for op, rate in self.error_rates.items():
            check_operation(op, allow_star=True)
            if not 0.0 <= float(rate) <= 1.0:
                raise InvalidRequest(f"error rate for {op} must be between 0 and 1, got {rate!r}")
        for op, count in self.fail_next.items():
            check_operation(op)
            if not isinstance(count, int) or count < 0:
                raise InvalidRequest(f"fail_next for {op} must be a whole number >= 0, got {count!r}")
        if self.extra_boot_delay < 0:
            raise InvalidRequest(f"extra_boot_delay must be >= 0, got {self.extra_boot_delay!r}")
        for op, seconds in self.slow_calls.items():
            check_operation(op)
            if not float(seconds) >= 0:
                raise InvalidRequest(f"slow_calls for {op} must be >= 0 seconds, got {seconds!r}")

    def rate_for(self, operation: str) -> float:
        return float(self.error_rates.get(operation, self.error_rates.get("*", 0.0)))


@dataclass(frozen=True)
class LocalCloudOptions:
    """How the LocalCloud behaves. Every field has a default; see the module docstring.

    - ``home``: where the state lives (``cloud.db``, ``config.json``, ``vms/``). Default
      ``$SLIPSTREAM_LOCAL_HOME``, else ``~/.slipstream/localcloud``.
    - ``boot_delay``: if set, seconds every boot takes whatever the flavour (tests use ~0.2).
    - ``boot_delay_by_family``: otherwise, seconds by flavour family (unknown families: 1.0).
    - ``stop_grace``: seconds between SIGTERM and SIGKILL when a VM is stopped or deleted.
    - ``quotas``: the project's limits (instances, cores, RAM, floating IPs, volumes, GB).
      Default: Jetstream2's Startup/Research CPU allocation, 150 cores, 585 GB RAM, 10 floating
      IPs; 10 instances (Nova's default: Jetstream2 publishes no instance count) and Cinder's
      10 volumes / 1000 GB (JS2 storage docs).
    - ``capacity``: the hypervisors (see :class:`HostGroup`); default :data:`DEFAULT_CAPACITY`.
    - ``faults``: see :class:`FaultOptions`.
    - ``ssh_port``: the port every Featured VM's sshd listens on; default 22 when running as
      root, else 2222 (each VM has its own address, so one port serves all).
    - ``network`` / ``floating_network``: where fixed and floating addresses come from. Both
      must lie in 127.0.0.0/8: the LocalCloud never binds anything else.
    """

    home: Path | None = None
    boot_delay: float | None = None
    boot_delay_by_family: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BOOT_DELAYS))
    stop_grace: float = 2.0
    quotas: Quotas = field(default_factory=lambda: RESEARCH_QUOTAS["cpu"])
    capacity: tuple[HostGroup, ...] = DEFAULT_CAPACITY
    faults: FaultOptions = field(default_factory=FaultOptions)
    ssh_port: int | None = None
    network: str = "127.64.0.0/16"
    floating_network: str = "127.65.0.0/16"

    def __post_init__(self) -> None:
        for what, cidr in (("network", self.network), ("floating_network", self.floating_network)):
            net = ipaddress.ip_network(cidr)
            if not net.subnet_of(_LOOPBACK):  # type: ignore[arg-type]
                raise InvalidRequest(
                    f"{what} {cidr} is outside 127.0.0.0/8",
                    hint="LocalCloud only ever uses loopback addresses; pick a 127.x range.")
        delays = [self.boot_delay or 0.0, *self.boot_delay_by_family.values(), self.stop_grace]
        if any(d < 0 for d in delays):
            raise InvalidRequest("boot delays and stop_grace must be >= 0 seconds")
        if self.ssh_port is not None and not 0 < self.ssh_port < 65536:
            raise InvalidRequest(f"ssh_port {self.ssh_port} is not a TCP port")

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser() if self.home else local_cloud_home()

    def boot_seconds(self, family: str) -> float:
        """How long a boot of a ``family`` flavour takes, fault delay included."""
        base = self.boot_delay if self.boot_delay is not None else self.boot_delay_by_family.get(family, 1.0)
        return base + self.faults.extra_boot_delay

    def effective_ssh_port(self) -> int:
        if self.ssh_port is not None:
            return self.ssh_port
        return 22 if os.geteuid() == 0 else 2222

    # persistence ------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data["home"] = str(self.home) if self.home else None
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalCloudOptions:
        faults = data.get("faults") or {}
        return cls(
            home=Path(data["home"]) if data.get("home") else None,
            boot_delay=data.get("boot_delay"),
            boot_delay_by_family=dict(data.get("boot_delay_by_family") or DEFAULT_BOOT_DELAYS),
            stop_grace=float(data.get("stop_grace", 2.0)),
            quotas=Quotas(**data["quotas"]) if data.get("quotas") else RESEARCH_QUOTAS["cpu"],
            capacity=tuple(HostGroup(**{**g, "families": tuple(g.get("families", ("m3",)))})
                           for g in data["capacity"]) if "capacity" in data else DEFAULT_CAPACITY,
            faults=FaultOptions(
                error_rates=dict(faults.get("error_rates") or {}),
                seed=int(faults.get("seed", 0)),
                fail_next=dict(faults.get("fail_next") or {}),
                extra_boot_delay=float(faults.get("extra_boot_delay", 0.0)),
                error_flavors=tuple(faults.get("error_flavors") or ()),
                no_capacity=tuple(faults.get("no_capacity") or ()),
                quota_recheck=tuple(faults.get("quota_recheck") or ()),
                slow_calls=dict(faults.get("slow_calls") or {}),
            ),
            ssh_port=data.get("ssh_port"),
            network=data.get("network", "127.64.0.0/16"),
            floating_network=data.get("floating_network", "127.65.0.0/16"),
        )

    def with_home(self, home: Path) -> LocalCloudOptions:
        return replace(self, home=home)


class ConfigFile:
    """``<home>/config.json``, re-read whenever another process rewrites it."""

    def __init__(self, home: Path) -> None:
        self.path = home / CONFIG_FILE
        self._stamp: tuple[int, int, int] | None = None
        self._options = LocalCloudOptions(home=home)

    def write(self, options: LocalCloudOptions) -> None:
        tmp = self.path.with_name(f".{CONFIG_FILE}.{os.getpid()}")
        tmp.write_text(options.to_json() + "\n")
        os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        self._stamp = None

    def read(self) -> LocalCloudOptions:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self._options
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every write is a new file (os.replace)
        if stamp != self._stamp:
            data = json.loads(self.path.read_text())
            self._options = LocalCloudOptions.from_dict(data).with_home(self.path.parent)
            self._stamp = stamp
        return self._options


def check_operation(name: str, allow_star: bool = False) -> None:
    if name in OPERATIONS or (allow_star and name == "*"):
        return
    raise InvalidRequest(f"unknown operation {name!r} in fault options",
                         hint=f"Valid operations: {', '.join(OPERATIONS)}" + (" or '*'." if allow_star else "."))
