"""The VM side of :class:`~slipstream.dask_cluster.CloudDaskCluster`: how a VM becomes a Dask
worker, the cluster's TLS keys, and the launches in flight.

- :func:`worker_user_data` — the ``#!`` script that installs Dask where the image lacks it,
  writes the worker's TLS files (mode 0600) and runs ``dask worker tls://…`` under the VM's name.
- :class:`ClusterTLS` — a certificate authority made in memory for one cluster, and the
  certificates it signs: one for the scheduler and client (this process), one for the workers.
  The scheduler accepts only peers with a certificate of that CA, so reaching its port is not
  enough to join it or submit work; and what travels between them (task payloads, results) is
  encrypted. The CA's key is never kept; nothing of it is logged.
- :class:`WorkerVMs` — creates each batch in the background, so the cluster's state lock is
  never held across a create call or a boot (``adapt()`` and its health checks keep running while
  VMs boot). A quota or capacity error backs off, is logged and kept in :attr:`WorkerVMs.error`,
  and the workers it could not create are forgotten, never counted as launched.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dask
import distributed
import numpy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler
from distributed.security import Security

from slipstream.cloud.errors import CloudError
from slipstream.retry import RetryPolicy
from slipstream.scaling.pool import Batch, WorkerPool

log = logging.getLogger("slipstream.dask")

DEFAULT_WORKER_PACKAGES: tuple[str, ...] = (
    f"dask[array]=={dask.__version__}", f"distributed=={distributed.__version__}", f"numpy=={numpy.__version__}")

#: Pauses between launch attempts after quota or capacity errors: 5 s, doubling, at most 5 min.
LAUNCH_BACKOFF = RetryPolicy(base_delay=5.0, max_delay=300.0)


#: Workers in a row whose VM came up but never joined (or went to ERROR) before the cluster stops
#: creating more: a broken image or user_data would otherwise be retried for ever, each boot
#: charged until its deadline. A worker that joins resets the count.
MAX_BROKEN_IN_A_ROW = 3


class NoWorkerVMs(RuntimeError):
    """The error a task waiting for a worker gets when no worker VM could be created for
    ``give_up_seconds`` (a quota of 0, no capacity for the flavour): the run fails with the
    cloud's words instead of hanging. One plain message argument, so it pickles like any error."""


# TLS ------------------------------------------------------------------------------------------
def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, days: int) -> str:
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, repr=False)
class ClusterTLS:
    """Mutual TLS for one cluster: a CA made in memory, a certificate for this process (scheduler
    and client) and one for its workers. ``repr`` shows no key."""

    ca: str
    local_cert: str
    local_key: str
    worker_cert: str
    worker_key: str

    @classmethod
    def new(cls, cluster: str, days: int = 30) -> ClusterTLS:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = f"slipstream dask CA {cluster}"
        ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True, days=days)
        local_key, worker_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        return cls(ca=ca,
                   local_cert=_certificate(f"{cluster} scheduler", local_key, ca_name, ca_key, ca=False, days=days),
                   local_key=_pem_key(local_key),
                   worker_cert=_certificate(f"{cluster} worker", worker_key, ca_name, ca_key, ca=False, days=days),
                   worker_key=_pem_key(worker_key))  # the CA key goes out of scope here: nothing more is signed

    def security(self) -> Security:
        """distributed's Security for the scheduler and the clients in this process (in memory)."""
        return Security(require_encryption=True, tls_ca_file=self.ca,
                        tls_scheduler_cert=self.local_cert, tls_scheduler_key=self.local_key,
                        tls_client_cert=self.local_cert, tls_client_key=self.local_key)

    def __repr__(self) -> str:
        return "ClusterTLS(<in memory>)"


# user_data ------------------------------------------------------------------------------------
def worker_user_data(scheduler_address: str, *, nthreads: int, packages: tuple[str, ...] = DEFAULT_WORKER_PACKAGES,
                     tls: ClusterTLS | None = None, death_timeout: float = 60.0) -> str:
    """The ``#!`` user_data that turns a fresh VM into a Dask worker of ``scheduler_address``.

    With ``tls`` it carries what this worker needs to join — the CA certificate and the workers'
    own certificate and key — written 0600 under ``/etc/slipstream-dask`` (the VM's disk on the
    LocalCloud), and nothing else of the cluster: no scheduler or client key, no Prefect setting.
    """
    pkgs = " ".join(shlex.quote(p) for p in packages)
    sched = shlex.quote(scheduler_address)
    tls_files = tls_args = ""
    if tls is not None:
        tls_files = "".join(
            f"cat >\"$tlsdir/{name}\" <<'SLIPSTREAM_PEM'\n{pem.strip()}\nSLIPSTREAM_PEM\n"
            for name, pem in (("ca.pem", tls.ca), ("worker.pem", tls.worker_cert), ("worker.key", tls.worker_key)))
        tls_args = ' --tls-ca-file "$tlsdir/ca.pem" --tls-cert "$tlsdir/worker.pem" --tls-key "$tlsdir/worker.key"'
    return f"""#!/bin/sh
# slipstream Dask worker: joins {scheduler_address} as this VM, on this VM's own address.
set -eu
umask 077
name="${{SLIPSTREAM_VM_NAME:-}}"
addr="${{SLIPSTREAM_VM_ADDRESS:-}}"
if [ -z "$name" ]; then  # a real VM: its name from the metadata service, its first address
  name=$(curl -fsS http://169.254.169.254/openstack/latest/meta_data.json |
         python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])')
  addr=$(hostname -I | cut -d' ' -f1)
fi
disk="${{SLIPSTREAM_VM_DISK:-}}"
tlsdir="$disk/etc/slipstream-dask"
mkdir -p "$tlsdir"
{tls_files}if ! command -v dask >/dev/null 2>&1; then
  # Featured images have python3 but not Dask: install the scheduler's versions into a venv.
  if [ ! -x /opt/slipstream-dask/bin/dask ]; then
    python3 -m venv /opt/slipstream-dask || {{ apt-get update -q && apt-get install -y -q python3-venv &&
                                               python3 -m venv /opt/slipstream-dask; }}
    /opt/slipstream-dask/bin/pip install -q {pkgs}
  fi
  PATH=/opt/slipstream-dask/bin:$PATH
fi
# Rejoin after an unshelve or a reboot: cloud-init runs per-boot scripts at every boot (the
# local cloud too, under the VM's disk). The worker stays in the boot's process group.
mkdir -p "$disk/var/lib/cloud/scripts/per-boot" "$disk/var/log"
printf "#!/bin/sh\\n'%s' >>'%s' 2>&1 &\\n" "$0" "$disk/var/log/slipstream-dask.log" \\
  > "$disk/var/lib/cloud/scripts/per-boot/slipstream-dask.sh"
chmod 700 "$disk/var/lib/cloud/scripts/per-boot/slipstream-dask.sh"
exec dask worker {sched} --host "$addr" --name "$name" --nthreads {int(nthreads)} \\
  --no-nanny --no-dashboard --death-timeout {death_timeout:.0f}{tls_args}
"""


# launches -------------------------------------------------------------------------------------
@dataclass
class LaunchFailure:
    """A batch the cloud refused: when, which workers, and the cloud's words."""

    at: float
    names: tuple[str, ...]
    error: str


@dataclass
class WorkerVMs:
    """The cluster's VMs as the event loop sees them: what was asked for, created, joined, refused.

    ``request(name)`` starts the VM's batch (or unparks it) in the background and returns at once;
    the cloud calls run in threads. ``on_failed(names)`` is called on the loop for workers whose
    create call failed; the cluster forgets them.
    """

    pool: WorkerPool
    nthreads: int
    packages: tuple[str, ...]
    boot_timeout: float
    give_up_seconds: float = 600.0  # failing creates with no worker up or booting: waiting tasks fail
    tls: ClusterTLS | None = None
    on_failed: Callable[[tuple[str, ...]], None] = lambda names: None
    next_work_in: Callable[[], float | None] = lambda: None  # set by the adaptive's forecast
    scheduler_address: str | None = None
    closing: bool = False
    batch_of: dict[str, Batch] = field(default_factory=dict)
    requested_at: dict[str, float] = field(default_factory=dict)  # the boot deadline counts from here
    joined: set[str] = field(default_factory=set)                  # joined since last requested
    unparking: set[str] = field(default_factory=set)               # unparked, not joined again yet
    created: list[str] = field(default_factory=list)
    failures: list[LaunchFailure] = field(default_factory=list)
    last_success: float = 0.0
    broken_in_a_row: int = 0  # workers whose VM was deleted as broken since a worker last joined
    had_worker_at: float = 0.0  # when a worker was last up or booting (the give-up counts from then)
    _launches: dict[str, asyncio.Future] = field(default_factory=dict)
    _cancelled: set[str] = field(default_factory=set)
    _releasing: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, count: int) -> Batch:
        batch = self.pool.next_batch(count)
        self.batch_of.update({n: batch for n in batch.names})
        return batch

    # launching ------------------------------------------------------------------------------
    @property
    def error(self) -> str | None:
        """The last launch failure, while launches are backing off because of it."""
        return self.failures[-1].error if self.failures and self.backing_off() else None

    @property
    def gave_up(self) -> bool:
        """True once :data:`MAX_BROKEN_IN_A_ROW` workers in a row were broken: no VM is created any more."""
        return self.broken_in_a_row >= MAX_BROKEN_IN_A_ROW

    def note_broken(self, name: str, why: str) -> None:
        """The health check deleted ``name``'s VM as broken (ERROR, or up and never joined)."""
        self.broken_in_a_row += 1
        self.failures.append(LaunchFailure(time.monotonic(), (name,), f"worker {name}: {why}"))
        if self.gave_up:
            log.error("%d worker VMs in a row were broken (last: %s: %s); no more are created", self.broken_in_a_row,
                      name, why)

    def backing_off(self, now: float | None = None) -> bool:
        """True while no new VM should be asked for: the last create failed less than a backoff
        ago, or too many workers in a row were broken."""
        if self.gave_up:
            return True
        if not self.failures:
            return False
        return (now or time.monotonic()) < self.failures[-1].at + self._backoff_seconds()

    def _backoff_seconds(self) -> float:
        streak = sum(1 for f in self.failures if f.at > self.last_success)  # failures in a row
        if not streak:
            return 0.0  # a batch was created since
        return RetryPolicy(attempts=streak + 1, base_delay=LAUNCH_BACKOFF.base_delay,
                           max_delay=LAUNCH_BACKOFF.max_delay).delays()[-1]

    def failing_since(self) -> float | None:
        """When the current run of failed launches began (none succeeded since), or None."""
        streak = [f.at for f in self.failures if f.at > self.last_success]
        return streak[0] if streak else None

    def request(self, name: str) -> None:
        """Bring ``name``'s VM up (create its batch, or unpark it) in the background. A VM that
        exists or is being created already is left alone (its worker object was only remade);
        once the cluster closes, nothing more is asked for."""
        if self.closing or self.gave_up:
            return
        parked = name in self.pool.parked()
        batch = self.batch_of.get(name)
        if not parked and (name in self.pool.servers or batch is None or batch.name in self._launches):
            return
        self.requested_at[name] = time.monotonic()
        self.joined.discard(name)
        self._cancelled.discard(name)
        if parked:
            self.unparking.add(name)
            self._launches[name] = asyncio.ensure_future(self._call(self.pool.unpark, (name,), name))
        else:
            self._launches[batch.name] = asyncio.ensure_future(self._launch(batch))

    async def _launch(self, batch: Batch) -> None:
        if self.pool.user_data is None:
            self.pool.user_data = worker_user_data(self.scheduler_address or "", nthreads=self.nthreads,
                                                   packages=self.packages, tls=self.tls)
        await self._call(self._create, batch.names, batch)

    def _create(self, batch: Batch) -> None:
        """In a worker thread: create the batch, then delete at once what was released, or the
        whole batch if the cluster closed, while the call was in flight. Done here, not back on
        the event loop: a closed cluster's loop may never run again, and its VMs would bill on."""
        asked_at = time.monotonic()
        self.pool.launch(batch)
        with self._lock:
            # When it was asked, not when it returned: a create that was already in flight when
            # another was refused says nothing about the quota since, and must not end the backoff.
            self.last_success = max(self.last_success, asked_at)
            self.created += batch.names
            gone = [n for n in batch.names if n in self._cancelled or self.closing]
        for name in gone:
            self.pool.delete(name)

    async def _call(self, call: Callable, names: tuple[str, ...], *args) -> bool:
        """A cloud call for ``names`` in a thread; on failure, note it, back off and forget them."""
        try:
            await asyncio.to_thread(call, *args)
            return True
        except Exception as err:  # noqa: BLE001 - quota, capacity, 5xx past the retries, or a bug: said, never lost
            self.failures.append(LaunchFailure(time.monotonic(), names, str(err)))
            log.warning("could not create workers %s: %s; no new worker VM for %.0f s", ", ".join(names),
                        err, self._backoff_seconds())
            self.on_failed(names)
            return False

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for create and unpark calls in flight: before a teardown.
        A create still in flight after that deletes its VMs itself when it returns."""
        deadline = time.monotonic() + timeout
        while (pending := [f for f in self._launches.values() if not f.done()]) and time.monotonic() < deadline:
            await asyncio.wait(pending, timeout=deadline - time.monotonic())

    def in_flight(self) -> list[str]:
        """Names of the workers whose create call has not returned yet."""
        batches = {b.name: b for b in self.batch_of.values()}  # unparks in flight are no creates: skipped
        return [n for key, f in self._launches.items() if not f.done() and key in batches and key not in self.unparking
                for n in batches[key].names]

    # letting go ------------------------------------------------------------------------------
    async def let_go(self, name: str) -> None:
        """Release ``name``'s VM: delete it if its worker never joined (nothing installed worth
        keeping), else as the idle policy says (park or delete). Idempotent."""
        if self.closing:
            return  # closing: the lease deletes everything at once, with a proof
        with self._lock:
            if name in self._releasing:
                return
            if name not in self.pool.servers:
                self._cancelled.add(name)  # its create call may still be in flight
                return
            self._releasing.add(name)
        try:
            if name in self.joined:
                await asyncio.to_thread(self.pool.release, name, self.next_work_in())
            else:
                await asyncio.to_thread(self.pool.delete, name)
        except Exception as err:  # noqa: BLE001 - a VM nobody wants must not bill on: delete it instead
            log.warning("could not release worker %s (%s); deleting its VM instead", name, err)
            await asyncio.to_thread(self.pool.delete, name)
        finally:
            with self._lock:
                self._releasing.discard(name)


class JoinedNames(SchedulerPlugin):
    """Notes each worker that joins the scheduler, so a VM whose worker never joined is deleted
    rather than parked when released."""

    def __init__(self, vms: WorkerVMs) -> None:
        self.vms = vms

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        name = str(scheduler.workers[worker].name)
        self.vms.joined.add(name)
        self.vms.unparking.discard(name)
        self.vms.broken_in_a_row = 0
