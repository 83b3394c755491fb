"""Batch creation + one list call per poll round, against create-and-wait one by one.

50 no-op VMs on a throwaway local cloud, both ways, in the same run (these machines are noisy:
read the ratios, not the absolute times). Run: .venv/bin/python benchmarks/local_provision.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from slipstream.cloud.local import LocalCloud, LocalCloudOptions
from slipstream.cloud.models import Ownership, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import Quotas

POLL = 0.25


def fresh_cloud(root: Path, n: int, subnet: int) -> LocalCloud:
    big = Quotas(instances=n, cores=n, ram_mb=n * 4096, floating_ips=10)
    return LocalCloud(home=root, options=LocalCloudOptions(
        home=root, boot_delay=1.0, quotas=big, network=f"127.64.{subnet}.0/24"))


def batched(cloud: LocalCloud, n: int) -> None:
    owner = Ownership.new("bench")
    servers = cloud.create_servers(ServerSpec("b", "m3.tiny", "slipstream-noop", count=n), owner)
    wait_for_servers(cloud, owner.run_id, [s.id for s in servers], timeout=600, poll_interval=POLL)


def one_by_one(cloud: LocalCloud, n: int) -> None:
    owner = Ownership.new("bench")
    for i in range(n):
        (server,) = cloud.create_servers(ServerSpec(f"s{i}", "m3.tiny", "slipstream-noop"), owner)
        deadline = time.monotonic() + 600
        while cloud.get_server(server.id).status != ServerStatus.ACTIVE:
            if time.monotonic() > deadline:
                raise TimeoutError(server.name)
            time.sleep(POLL)


def measure(name: str, fn, cloud: LocalCloud, n: int) -> tuple[float, int]:
    cloud.api_calls = 0
    start = time.perf_counter()
    try:
        fn(cloud, n)
        return time.perf_counter() - start, cloud.api_calls
    finally:
        cloud.reset()


def main(n: int = 50) -> None:
    with tempfile.TemporaryDirectory(prefix="slipstream-bench-") as tmp:
        base_t, base_calls = measure("one by one", one_by_one, fresh_cloud(Path(tmp) / "a", n, 201), n)
        ours_t, ours_calls = measure("batched", batched, fresh_cloud(Path(tmp) / "b", n, 202), n)
    print(f"{n} no-op VMs, boot delay 1.0 s, poll every {POLL} s")
    print(f"{'strategy':<28}{'wall s':>10}{'API calls':>12}")
    print(f"{'create+wait one by one':<28}{base_t:>10.2f}{base_calls:>12}")
    print(f"{'one batch, one list/round':<28}{ours_t:>10.2f}{ours_calls:>12}")
    print(f"ratio (one by one / batched): wall {base_t / ours_t:.1f}x, API calls {base_calls / ours_calls:.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
