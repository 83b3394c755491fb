"""One elastic Slurm cluster's settings, and the ``slurm.conf`` rendered from them.

:class:`ClusterSettings` is everything the power programs need to act for the cluster: its
cloud, its ownership (every worker VM is owned by the cluster's run, so the reaper and the
flow's teardown find them), the worker flavour and image, the Slurm timers and where the files
live. It is saved as ``cluster.json`` next to ``slurm.conf`` in the cluster's directory, which
plays the part of the shared ``/home`` of a Jetstream2 virtual cluster (the head node, the
workers and the submitting user all see it)::

    <directory>/slurm.conf  cluster.json  bin/{resume,suspend,resume-fail}  power.log
    <directory>/state/  log/slurmctld.log  log/slurmd-<node>.log  spool/<node>/  munge/

Nodes are ``<name>-1`` … ``<name>-<max_nodes>``, ``State=CLOUD``, in partition ``cloud``.

On the local cloud (``loopback=True``) every daemon runs on this host: each binds its own VM's
127.x address (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`` with the daemon's
hostname, in a UTS namespace of its own, set to that address), the workers share the head's
``munged`` through its socket, and ``slurmd`` reports the configured CPUs and memory.

Every setting of the rendered ``slurm.conf``, and why (defaults of :class:`ClusterSettings`):

====================================================  =================================================
setting                                               why this value
====================================================  =================================================
``ClusterName=<name>``                                the cluster's name; nodes are ``<name>-<i>``
``SlurmctldHost=<head address>``                      the head VM runs slurmctld (real clouds:
                                                      ``<name>-head(<address>)``)
``SlurmctldPort=6817``; node ``Port=6818+i-1``        Slurm's defaults; local-cloud slurmds share one
                                                      host, so each node gets a port of its own
``SlurmUser=root``, ``SlurmdUser=root``               the daemons run as whoever runs the VMs
``AuthType=auth/munge``, ``CredType=cred/munge``      munge, Slurm's standard authentication
``StateSaveLocation``, ``SlurmdSpoolDir``, pid/log    inside the cluster's directory: nothing in /etc or
files                                                 /var, deleted with the cluster (logs kept first)
``ProctrackType=proctrack/linuxproc``                 no cgroups needed: a local VM is a process group
``TaskPlugin=task/none``                              the same: no cgroup or affinity binding
``SelectType=select/cons_tres``, ``CR_Core``          jobs share a node by cores; cons_tres schedules GPUs
``AccountingStorageType=accounting_storage/none``     no slurmdbd: the flow records each job's end the
                                                      first time it sees it (see :mod:`.jobs`)
``JobAcctGatherType=jobacct_gather/none``             no accounting to gather for
``MpiDefault=none``, ``MailProg=/bin/true``           no MPI plugin, no mail
``ReturnToService=2``                                 a DOWN node whose slurmd registers is usable again
``SchedulerType=sched/backfill``                      Slurm's default scheduler
``KillWait=5``                                        a cancelled job's processes go within 5 s, not 30,
                                                      before the flow deletes the VMs
``MinJobAge=300`` (``min_job_age``)                   finished jobs stay in squeue 5 min; the flow no
                                                      longer depends on it (tests compress it to 2 s)
``SlurmdTimeout=60``                                  a node whose slurmd stops answering is DOWN in 1 min
``TreeWidth=65533``                                   slurmctld talks to every node directly: cloud nodes
                                                      cannot resolve each other to forward messages
``PrivateData=cloud``                                 powered-down cloud nodes stay visible in sinfo
``ResumeProgram``, ``SuspendProgram``,                ``<dir>/bin/*`` = ``slipstream slurm resume |
``ResumeFailProgram``                                 suspend | resume-fail`` with the cluster's env
``SuspendTime=300`` (``suspend_time``)                idle seconds before a node's VM is deleted
``SuspendTimeout=30`` (``suspend_timeout``)           seconds a VM delete may take before the node may be
                                                      resumed again
``ResumeTimeout=300`` (``resume_timeout``)            seconds to boot and register; then resume-fail,
                                                      back-off (60 s doubling), drained after 3 failures
``ResumeRate=0``, ``SuspendRate=0``                   no rate limit: the nodes of a cycle come in one
                                                      call, created in one batch (split by the quota)
``SlurmctldParameters=idle_on_node_suspend``          a powered-down node is usable again, also after a
                                                      failure; slipstream's own count stops boot loops
``NodeName=… CPUs RealMemory State=CLOUD``            the flavour's vCPUs and RAM; VMs made on demand
``GresTypes=gpu``, ``Gres=gpu:<n>``, ``gres.conf``    GPU flavours only: each VM sees one GPU (vGPU slice
                                                      or A100), so ``--gres=gpu:1`` is schedulable
``NodeAddr=127.0.0.1`` (local cloud)                  before a node's first resume nothing listens there:
                                                      a message to it fails at once (no DNS stall)
``PartitionName=cloud Default=YES MaxTime=INFINITE``  one partition of every node; time is bounded by the
                                                      flow's ``max_hours``
``CommunicationParameters=NoCtldInAddrAny,            local cloud: each daemon binds only its VM's 127.x
NoInAddrAny``                                         address
``AuthInfo=cred_expire=<requeue_delay>``             a job requeued by a failed resume may start again
                                                      after this many seconds (Slurm's default 120)
``AuthInfo=socket=<dir>/munge/munge.socket``          local cloud: the workers share the head's munged
``SlurmdParameters=config_overrides``                 local cloud: slurmd reports the flavour's CPUs and
                                                      memory, not this host's
====================================================  =================================================
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Ownership, check_name
from slipstream.jetstream2 import FLAVORS

PARTITION = "cloud"
#: Where a local-cloud node points before its first resume: nothing listens there, so a message
#: slurmctld sends to a node that never came up is refused at once (a node name would be looked
#: up in DNS, which stalls slurmctld for ~10 s per attempt).
PARKED_ADDRESS = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ClusterSettings:
    name: str                       # DNS label; the nodes are <name>-<i>, the head <name>-head
    cloud: str                      # "local" or "<block-type>/<document>" (blocks.load_cloud)
    run_id: str                     # ownership of every VM of the cluster
    pipeline: str
    creator: str
    expires_at: str                 # ISO 8601, the lease of every VM
    directory: str                  # the shared directory (see the module docstring)
    head_address: str
    flavor: str = "m3.tiny"
    image: str = "slipstream-noop"
    max_nodes: int = 4
    loopback: bool = True           # local cloud: every daemon on this host (see module docstring)
    slurmctld_port: int = 6817
    slurmd_port: int = 6818         # node i listens on slurmd_port + i - 1
    suspend_time: int = 300         # idle seconds before a node is deleted
    suspend_timeout: int = 30
    resume_timeout: int = 300
    min_job_age: int = 300          # seconds slurmctld keeps a finished job (tests compress it)
    max_resume_attempts: int = 3    # failed resumes of a node before it is drained for good
    resume_backoff: int = 60        # seconds after a failed resume before the node may boot again (doubling)
    requeue_delay: int = 120        # seconds a requeued job (its node failed to resume) waits to start again
    boot_timeout: float = 240.0     # how long resume waits for the VMs to be ACTIVE
    env: dict[str, str] = field(default_factory=dict)  # exported to the power programs

    def __post_init__(self) -> None:
        check_name(self.name, "cluster name")
        check_name(f"{self.name}-head", "cluster name")
        if self.flavor not in FLAVORS:
            raise InvalidRequest(f"unknown flavour {self.flavor!r} for the cluster's nodes",
                                 hint=f"Choose one of: {', '.join(sorted(FLAVORS))}.")
        if not 1 <= self.max_nodes <= 1000:
            raise InvalidRequest(f"max_nodes must be 1..1000, got {self.max_nodes}",
                                 hint="Give the largest number of worker nodes the cluster may hold.")
        if self.min_job_age < 2:  # slurmctld's own minimum
            raise InvalidRequest(f"min_job_age must be at least 2 seconds, got {self.min_job_age}")
        for key in ("suspend_time", "suspend_timeout", "resume_timeout", "max_resume_attempts", "requeue_delay"):
            if getattr(self, key) < 1:
                raise InvalidRequest(f"{key} must be at least 1 second", hint=f"Set {key} in seconds.")

    # paths -----------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return Path(self.directory)

    @property
    def conf_path(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def settings_path(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def gpus_per_node(self) -> int:
        """GPUs a node's VM sees: one vGPU slice (g3.small … g3.large) or whole A100s."""
        return math.ceil(FLAVORS[self.flavor].gpus)

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge" / "munge.socket"

    @property
    def node_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, self.max_nodes + 1)]

    @property
    def hostlist(self) -> str:
        return f"{self.name}-[1-{self.max_nodes}]" if self.max_nodes > 1 else f"{self.name}-1"

    @property
    def owner(self) -> Ownership:
        return Ownership(self.run_id, self.pipeline, self.creator, datetime.fromisoformat(self.expires_at))

    def program(self, action: str) -> Path:
        return self.dir / "bin" / action

    # saving ----------------------------------------------------------------------------------
    def save(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings_path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return self.settings_path

    @classmethod
    def load(cls, path: Path | str) -> ClusterSettings:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise InvalidRequest(f"cannot read the cluster settings {path}: {err}",
                                 hint="Set SLIPSTREAM_SLURM_CLUSTER to the cluster's cluster.json "
                                      "(the programs in <cluster>/bin do).") from None
        return cls(**data)


def render_slurm_conf(s: ClusterSettings) -> str:
    """``slurm.conf`` for the head node and every cloud node of ``s``."""
    flavor = FLAVORS[s.flavor]
    d = s.dir
    last_port = s.slurmd_port + s.max_nodes - 1
    ports = f"[{s.slurmd_port}-{last_port}]" if s.max_nodes > 1 else str(s.slurmd_port)
    lines = [
        "# Rendered by slipstream (slipstream/slurm/config.py) for cluster " + s.name,
        f"ClusterName={s.name}",
        f"SlurmctldHost={s.head_address}" if s.loopback else f"SlurmctldHost={s.name}-head({s.head_address})",
        f"SlurmctldPort={s.slurmctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool' / '%n'}",
        f"SlurmctldPidFile={d / 'state' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'spool' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "KillWait=5",
        f"MinJobAge={s.min_job_age}",
        "SlurmdTimeout=60",
        "TreeWidth=65533",           # slurmctld talks to every cloud node directly
        "PrivateData=cloud",         # else powered-down cloud nodes are hidden from sinfo/scontrol
        "# --- power saving: cloud nodes are VMs created on demand and deleted when idle",
        f"ResumeProgram={s.program('resume')}",
        f"SuspendProgram={s.program('suspend')}",
        f"ResumeFailProgram={s.program('resume-fail')}",
        f"SuspendTime={s.suspend_time}",
        f"SuspendTimeout={s.suspend_timeout}",
        f"ResumeTimeout={s.resume_timeout}",
        "ResumeRate=0",
        "SuspendRate=0",
        "SlurmctldParameters=idle_on_node_suspend",
        *(["GresTypes=gpu"] if s.gpus_per_node else []),
        f"NodeName={s.hostlist} CPUs={flavor.vcpus} RealMemory={flavor.ram_mb} State=CLOUD Port={ports}"
        + (f" Gres=gpu:{s.gpus_per_node}" if s.gpus_per_node else "")
        + (f" NodeAddr={','.join([PARKED_ADDRESS] * s.max_nodes)}" if s.loopback else ""),
        f"PartitionName={PARTITION} Nodes={s.hostlist} Default=YES MaxTime=INFINITE State=UP",
    ]
    auth_info = f"cred_expire={s.requeue_delay}"  # also how long a job requeued by a failed resume waits
    if s.loopback:
        auth_info = f"socket={s.munge_socket},{auth_info}"
        lines += [
            "# local cloud: every daemon binds its own VM's 127.x address, and shares the head's munged",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "SlurmdParameters=config_overrides",
        ]
    lines.append(f"AuthInfo={auth_info}")
    return "\n".join(lines) + "\n"


def render_gres_conf(s: ClusterSettings) -> str:
    """``gres.conf`` (next to slurm.conf, where slurmd looks): the GPUs of a GPU flavour's nodes.
    slurmd drops a GPU without a device file, so a real VM's are /dev/nvidia0…; a local-cloud
    node has no GPU device, and stands in ``<directory>/gpu/nvidia<i>`` (plain files: with
    ``TaskPlugin=task/none`` nothing binds them)."""
    n = s.gpus_per_node
    if not n:
        return ""
    base = str(s.dir / "gpu" / "nvidia") if s.loopback else "/dev/nvidia"
    files = base + (f"[0-{n - 1}]" if n > 1 else "0")
    return f"# Rendered by slipstream for cluster {s.name}\nNodeName={s.hostlist} Name=gpu File={files}\n"


def write_cluster_files(s: ClusterSettings) -> Path:
    """Write ``cluster.json``, ``slurm.conf`` and the three power programs; returns slurm.conf."""
    for sub in ("bin", "state", "log", "spool", "munge"):
        (s.dir / sub).mkdir(parents=True, exist_ok=True)
    (s.dir / "munge").chmod(0o700)
    s.save()
    env = {
        **s.env,
        "SLURM_CONF": str(s.conf_path),
        "SLIPSTREAM_SLURM_CLUSTER": str(s.settings_path),
        "PYTHONPATH": str(REPO_ROOT),
    }
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    for action in ("resume", "suspend", "resume-fail"):
        path = s.program(action)
        # slurmctld runs this with the hostlist as $1; everything else comes from the files above.
        path.write_text(f"#!/bin/sh\n# slurmctld's {action} program for cluster {s.name} (slipstream)\n"
                        f"{exports}exec {shlex.quote(sys.executable)} -m slipstream.cli slurm {action} \"$1\"\n")
        path.chmod(0o755)
    if gres := render_gres_conf(s):
        (s.dir / "gres.conf").write_text(gres)
        if s.loopback:
            (s.dir / "gpu").mkdir(exist_ok=True)
            for i in range(s.gpus_per_node):
                (s.dir / "gpu" / f"nvidia{i}").touch()
    tmp = s.conf_path.with_suffix(".tmp")
    tmp.write_text(render_slurm_conf(s))
    tmp.replace(s.conf_path)  # the head node waits for this file: it must appear whole
    return s.conf_path
