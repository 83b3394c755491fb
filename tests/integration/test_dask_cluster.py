"""CloudDaskCluster on real LocalCloud VMs: `dask worker` started by user_data on each VM's own
127.64.x.y address, batches, adapt() by slipstream's policy, scale(n), and a clean teardown."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import dask
import dask.array as da
import distributed
import numpy as np
import pytest

from slipstream.cost.accounting import meter_servers
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import ServerStatus
from slipstream.cloud.local.addresses import tcp_listeners
from slipstream.dask_cluster import CloudDaskCluster, worker_user_data
from slipstream.jetstream2 import FLAVORS, su_per_hour
from tests.support import wait_until

SCALING = {"max_workers": 4, "batch_size": 2, "cooldown_seconds": 1.0, "boot_seconds": 1.0, "flavor": "m3.small"}


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (e.g. a scheduler address)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def peak_servers(cloud, run_id: str) -> int:
    edges = []
    for h in cloud.server_history(run_id):
        edges += [(h.created_at, 1)] + ([(h.deleted_at, -1)] if h.deleted_at else [])
    peak = now = 0
    for _, step in sorted(edges):
        now += step
        peak = max(peak, now)
    return peak


def test_adapt_grows_in_batches_computes_and_shrinks_back_to_zero(local_cloud):
    x = da.random.default_rng(7).standard_normal((6_000, 500), chunks=(250, 500))

    def chunk_work(block):
        time.sleep(0.2)  # each chunk takes a while, so the queue outlasts a boot
        return block

    with dask.config.set(scheduler="sync"):
        expected = (float(x.mean().compute()), float(x.std().compute()))
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING) as cluster:
        cluster.adapt(minimum=0, maximum=4, interval="0.2s")
        address = cluster.scheduler_address
        with distributed.Client(cluster) as client:
            y = x.map_blocks(chunk_work)
            mean, std = client.compute([y.mean(), y.std()], sync=True)
            workers_seen = {w["name"]: w["host"] for w in client.scheduler_info()["workers"].values()}
        assert (mean, std) == pytest.approx(expected, rel=1e-12)
        launched = cluster.launched
        # Grew in batches of at most 2 (b1 = 2 VMs in one call, ...), never past 4 at once.
        assert len(launched) >= 2 and launched[:2] == [f"{cluster.vms.pool.prefix}-b1-1", f"{cluster.vms.pool.prefix}-b1-2"]
        assert 2 <= peak_servers(local_cloud, cluster.run_id) <= 4
        # Each worker runs on its own VM's address.
        vms = {s.name: s.address for s in local_cloud.list_servers(run_id=cluster.run_id)}
        assert all(vms[name] == host for name, host in workers_seen.items() if name in vms)
        # ...and the policy lets every worker go after the 1 s cooldown: the pool is back to 0.
        wait_until(lambda: not local_cloud.list_servers(run_id=cluster.run_id), timeout=30,
                   what="the pool shrinking back to 0 VMs")
        assert any(d.release for d in cluster._adaptive.decisions)
    proof = cluster.teardown_proof
    assert proof is not None and proof.clean, proof.summary()
    assert local_cloud.list_servers(run_id=cluster.run_id) == []
    wait_until(lambda: not processes_naming(address), timeout=10, what="no dask worker of the cluster left")


def test_scale_n_starts_workers_on_vms_and_close_deletes_them_with_a_proof(local_cloud):
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING) as cluster:
        cluster.scale(3)  # one batch of 2 and one of 1
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 3, timeout=60, what="3 workers joined")
        servers = local_cloud.list_servers(run_id=cluster.run_id)
        assert sorted(s.name for s in servers) == sorted(cluster.launched)
        assert all(s.flavor == "m3.small" and s.ownership.run_id == cluster.run_id for s in servers)
        # Each worker listens on its own VM's 127.64.x.y address, under the VM's name.
        hosts = {w["name"]: w["host"] for w in cluster.scheduler_info["workers"].values()}
        assert hosts == {s.name: s.address for s in servers}
        with distributed.Client(cluster) as client:
            assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
        address = cluster.scheduler_address
        # The scheduler and its HTTP endpoints listen on loopback only.
        ports = {cluster.scheduler.port, cluster.scheduler.http_server.port}
        assert {a for a, p in tcp_listeners() if p in ports} == {"127.0.0.1"}
    proof = cluster.teardown_proof
    assert proof.clean and {r.name for r in proof.deleted if r.kind == "server"} == {s.name for s in servers}
    wait_until(lambda: not processes_naming(address), timeout=10, what="no dask worker left")


def test_bad_settings_are_refused_before_any_vm_exists(local_cloud):
    with pytest.raises(InvalidRequest, match="image 'Featured-Ubuntu99' is not on local.*Images there"):
        CloudDaskCluster(local_cloud, image="Featured-Ubuntu99")
    with pytest.raises(InvalidRequest, match="bad scaling settings.*max_wrokers"):
        CloudDaskCluster(local_cloud, image="slipstream-noop", scaling={"max_wrokers": 3})
    with pytest.raises(InvalidRequest, match="'suspend' is not allowed for g3.medium"):
        CloudDaskCluster(local_cloud, image="slipstream-noop", scaling={"flavor": "g3.medium", "idle": {"action": "suspend"}})
    with pytest.raises(InvalidRequest, match="contact_address 'tcp://10.0.0.5:8786' is not a TLS address"):
        CloudDaskCluster(local_cloud, image="slipstream-noop", contact_address="tcp://10.0.0.5:8786")
    with pytest.raises(InvalidRequest, match="give_up_seconds must be a positive number of seconds, got -1"):
        CloudDaskCluster(local_cloud, image="slipstream-noop", give_up_seconds=-1)  # would fail all work at once
    with pytest.raises(InvalidRequest, match="cloud_check_seconds must be a positive"):
        CloudDaskCluster(local_cloud, image="slipstream-noop", cloud_check_seconds=0)
    assert local_cloud.list_servers() == []


def test_a_released_worker_is_shelved_for_no_sus_and_rejoins_by_itself_after_unshelve(local_cloud):
    scaling = {**SCALING, "idle": {"action": "shelve", "park_when_back_within_seconds": 600}}
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=scaling) as cluster:
        cluster.vms.next_work_in = lambda: 60.0  # what adapt()'s forecast says when bursts keep coming
        cluster.scale(1)
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 1, timeout=60, what="the worker joined")
        (server,) = local_cloud.list_servers(run_id=cluster.run_id)
        address = cluster.scheduler_address

        cluster.scale(0)  # released while work is expected back: parked, not deleted
        wait_until(lambda: cluster.vms.pool.parked() == [server.name]
                   and local_cloud.get_server(server.id).status == ServerStatus.SHELVED_OFFLOADED, timeout=60,
                   what="the released worker's VM shelved and counted as parked")
        wait_until(lambda: not cluster.scheduler_info["workers"] and not processes_naming(address), timeout=30,
                   what="the shelved VM's dask worker gone")

        cluster.scale(1)  # parked VMs come back first: unshelve, and the per-boot script restarts the worker
        wait_until(lambda: [w["name"] for w in cluster.scheduler_info["workers"].values()] == [server.name],
                   timeout=60, what="the unshelved worker rejoined under its name")
        assert [s.id for s in local_cloud.list_servers(run_id=cluster.run_id)] == [server.id]  # no new VM
        with distributed.Client(cluster) as client:
            assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
    assert cluster.teardown_proof.clean
    (history,) = local_cloud.server_history(cluster.run_id)
    states = [s for s, _ in history.log]
    shelved = states.index(ServerStatus.SHELVED_OFFLOADED)
    assert ServerStatus.ACTIVE in states[:shelved] and ServerStatus.ACTIVE in states[shelved:]
    (metered,) = meter_servers(local_cloud, [(history.id, history.name, history.flavor)])
    active_hours = sum((nxt[1] - since).total_seconds() / 3600
                       for (status, since), nxt in zip(history.log, history.log[1:]) if status == ServerStatus.ACTIVE)
    assert metered.su == pytest.approx(active_hours * su_per_hour(FLAVORS["m3.small"]), rel=1e-9)  # shelved: 0 SU


def test_the_worker_user_data_installs_matching_dask_on_real_images():
    script = worker_user_data("tcp://head.example.org:8786", nthreads=4)
    assert f"distributed=={distributed.__version__}" in script and f"numpy=={np.__version__}" in script
    assert 'dask worker tcp://head.example.org:8786 --host "$addr" --name "$name" --nthreads 4' in script
    assert "/var/lib/cloud/scripts/per-boot/" in script  # rejoins after unshelve on real images
    subprocess.run(["sh", "-n", "-c", script], check=True)  # valid shell
    from slipstream.dask_workers import ClusterTLS

    tls = ClusterTLS.new("dask-test")
    script = worker_user_data("tls://head.example.org:8786", nthreads=4, tls=tls)
    assert '--tls-ca-file "$tlsdir/ca.pem" --tls-cert "$tlsdir/worker.pem" --tls-key "$tlsdir/worker.key"' in script
    assert "umask 077" in script and tls.local_key.strip() not in script
    subprocess.run(["sh", "-n", "-c", script], check=True)


def test_a_worker_vm_deleted_behind_the_clusters_back_is_replaced(local_cloud):
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING) as cluster:
        adaptive = cluster.adapt(minimum=2, maximum=2, interval="0.2s", cloud_check_seconds=0.5)
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 2, timeout=60, what="2 workers joined")
        victim = next(s for s in local_cloud.list_servers(run_id=cluster.run_id))
        local_cloud.delete_server(victim.id)  # someone deletes a worker VM in Horizon
        # The table says "vm gone -> forget"; the policy (min 2) launches a replacement.
        wait_until(lambda: (victim.name, "forget (already gone)") in [(n, str(a)) for n, a in adaptive.repairs],
                   timeout=30, what="the lost worker forgotten")
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 2 and victim.name not in
                   {w["name"] for w in cluster.scheduler_info["workers"].values()}, timeout=60,
                   what="a replacement worker joined")
        assert len(local_cloud.list_servers(run_id=cluster.run_id)) == 2
    assert cluster.teardown_proof.clean


def test_the_scheduler_speaks_mutual_tls_with_this_clusters_keys_only(local_cloud, caplog):
    from distributed.security import Security

    caplog.set_level(logging.DEBUG)
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING) as cluster:
        cluster.scale(1)
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 1, timeout=60, what="the worker joined")
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        assert all(w["id"] and addr.startswith("tls://") for addr, w in cluster.scheduler_info["workers"].items())
        with distributed.Client(cluster) as client:  # the cluster's own keys: accepted
            assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
        # Anyone else who reaches the port: plain TCP, or TLS with a certificate of another CA.
        for security in (None, Security.temporary()):
            with pytest.raises((OSError, TimeoutError)):
                distributed.Client(address.replace("tls://", "tcp://") if security is None else address,
                                   security=security, timeout=3)
        (server,) = local_cloud.list_servers(run_id=cluster.run_id)
        (key_file,) = Path(local_cloud.home).rglob("etc/slipstream-dask/worker.key")  # on the VM's disk
        assert (key_file.stat().st_mode & 0o777) == 0o600
        (copy,) = Path(local_cloud.home).glob(f"vms/{server.id}/user_data")  # holds that key too
        assert (copy.stat().st_mode & 0o077) == 0
        (script,) = Path(local_cloud.home).rglob("instance/scripts/part-001")
        assert (script.stat().st_mode & 0o077) == 0
        user_data = cluster.vms.pool.user_data
        assert cluster.tls.worker_key.strip() in user_data and cluster.tls.local_key.strip() not in user_data
        assert "PREFECT" not in user_data
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in logged and "PRIVATE KEY" not in repr(cluster.tls)


def test_two_clusters_of_one_run_never_share_a_worker_name(local_cloud):
    run_id = "7f3c2a1e-0000-4000-8000-000000000001"
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING, run_id=run_id) as a, \
            CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=SCALING, run_id=run_id) as b:
        a.scale(1)
        b.scale(1)
        wait_until(lambda: len(a.launched) == 1 and len(b.launched) == 1, timeout=30, what="both workers created")
        assert a.launched != b.launched
        names = [s.name for s in local_cloud.list_servers(run_id=run_id)]
        assert sorted(names) == sorted(a.launched + b.launched)
    assert a.teardown_proof.clean and b.teardown_proof.clean


def test_a_cloud_can_be_named_as_the_readme_shows(local_cloud, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_LOCAL_HOME", str(local_cloud.home))
    with CloudDaskCluster("local", image="slipstream-noop", scaling=SCALING) as cluster:
        assert cluster.cloud.home == local_cloud.home
    assert cluster.teardown_proof.clean
