"""HTTP requests and wall time on the OpenStack lab: slipstream's batch against openstacksdk's cloud layer.

N servers (default 3, m3.tiny, Featured-Ubuntu24, auto_allocated_network) are brought to ACTIVE
and deleted two ways in the same run:

- ours: ``Lease.create_servers`` (one batch request) + ``wait_for_servers`` (one list per poll
  round) + the Lease's teardown (deletes, waits until gone, proves nothing is left);
- baseline: openstacksdk's cloud layer, ``conn.create_server(..., wait=True, auto_ip=False)`` one
  server at a time, then ``conn.delete_server(..., wait=True)`` one at a time.

Each way gets its own freshly signed-in connection (cold caches, token already issued), and the
same ``response`` hook on its keystoneauth session counts every HTTP request it sends. The lab
(``lab/lab.sh up``) must be running; this script never starts or stops it. Loopback only.

Run: .venv/bin/python benchmarks/openstack_calls.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from slipstream import lab
from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.cloud.openstack import OpenStackCloud, connect
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger

FLAVOR = "m3.tiny"
IMAGE = "Featured-Ubuntu24"
NETWORK = "auto_allocated_network"
TIMEOUT = 300.0  # seconds: deadline of every wait (boot and delete)
POLL = 1.0  # seconds between list rounds in wait_for_servers


class RequestCounter:
    """A keystoneauth ``response`` hook: counts every HTTP request the session sends."""

    def __init__(self, cloud: OpenStackCloud) -> None:
        self.count = 0
        self._lock = threading.Lock()
        cloud.conn.session.session.hooks.setdefault("response", []).append(self._hook)

    def _hook(self, response, *args, **kwargs):
        with self._lock:
            self.count += 1
        return response

    def reset(self) -> None:
        with self._lock:
            self.count = 0


def open_cloud() -> OpenStackCloud:
    return connect(lab.CLOUD, clouds_yaml_path=lab.clouds_yaml())


def ours(n: int, prefix: str, ledger_dir: Path) -> tuple[float, int, str]:
    cloud = open_cloud()
    try:
        counter = RequestCounter(cloud)
        owner = Ownership.new("bench", run_id=f"{prefix}a", lease=timedelta(hours=1))
        counter.reset()
        start = time.perf_counter()
        with Lease(cloud, owner, ledger=Ledger(ledger_dir / "ledger.db"), delete_timeout=TIMEOUT) as lease:
            servers = lease.create_servers(ServerSpec(f"{prefix}a", FLAVOR, IMAGE, count=n, network=NETWORK))
            wait_for_servers(cloud, owner.run_id, [s.id for s in servers], timeout=TIMEOUT, poll_interval=POLL)
        elapsed, requests = time.perf_counter() - start, counter.count
        proof = lease.proof
        assert proof is not None and proof.clean and not proof.errors, proof and proof.summary()
        return elapsed, requests, proof.summary()
    finally:
        cloud.close()


def baseline(n: int, prefix: str) -> tuple[float, int]:
    cloud = open_cloud()
    conn = cloud.conn
    made: list[str] = []
    try:
        counter = RequestCounter(cloud)
        counter.reset()
        start = time.perf_counter()
        try:
            for i in range(1, n + 1):
                server = conn.create_server(
                    f"{prefix}b-{i}", image=IMAGE, flavor=FLAVOR, network=NETWORK,
                    wait=True, auto_ip=False, timeout=TIMEOUT,
                )
                made.append(server.id)
            for server_id in made:
                conn.delete_server(server_id, wait=True, timeout=TIMEOUT)
        finally:
            elapsed, requests = time.perf_counter() - start, counter.count
            # whatever happened above, leave nothing behind (not counted)
            for server in conn.compute.servers(name=f"^{prefix}b-"):
                conn.compute.delete_server(server, ignore_missing=True)
                conn.compute.wait_for_delete(server, wait=TIMEOUT)
        return elapsed, requests
    finally:
        cloud.close()


def leftovers(prefix: str) -> list[str]:
    cloud = open_cloud()
    try:
        return [s.name for s in cloud.conn.compute.servers() if s.name.startswith(prefix)]
    finally:
        cloud.close()


def main(n: int = 3) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"  # every server of this run starts with it
    try:
        with tempfile.TemporaryDirectory(prefix="slipstream-bench-") as tmp:
            ours_t, ours_req, proof = ours(n, prefix, Path(tmp))
        base_t, base_req = baseline(n, prefix)
    finally:
        left = leftovers(prefix)
    assert not left, f"servers of run {prefix} left behind: {left}"
    print(f"{n} x {FLAVOR} ({IMAGE}) on the lab ({lab.CLOUD}, fake hypervisor), run {prefix}")
    print(f"{'strategy':<52}{'wall s':>9}{'HTTP requests':>15}")
    print(f"{'ours: 1 batch create, 1 list/round, Lease teardown':<52}{ours_t:>9.2f}{ours_req:>15}")
    print(f"{'baseline: sdk cloud layer create/delete wait=True':<52}{base_t:>9.2f}{base_req:>15}")
    print(f"ratio (baseline / ours): wall {base_t / ours_t:.2f}x, HTTP requests {base_req / ours_req:.2f}x")
    print(proof)
    print(f"left behind: no servers named {prefix}* in the project")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
