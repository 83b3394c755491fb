"""LocalCloud quotas and capacity: QuotaExceeded up front, "No valid host" like Nova, all or nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slipstream.cloud.errors import CapacityError, QuotaExceeded
from slipstream.cloud.local import HostGroup, LocalCloud, LocalCloudOptions
from slipstream.cloud.local.capacity import NO_VALID_HOST, build_hosts, place_all
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import FLAVORS, Quotas
from support import owner

S = ServerStatus
NOOP = "slipstream-noop"
BIG_QUOTA = Quotas(instances=50, cores=5000, ram_mb=50_000 * 1024, floating_ips=10)



def configure(cloud: LocalCloud, **changes) -> LocalCloud:
    """Rewrite the cloud's config.json; ``cloud`` (like every process) picks it up."""
    LocalCloud(options=replace(cloud.options, **changes))
    return cloud


def gpu_hosts(count: int = 1, gpus: int = 1) -> tuple[HostGroup, ...]:
    return (HostGroup("gpu", count, vcpus=128, ram_mb=512 * 1024, gpus=gpus, families=("g3", "g4", "g5")),)


def statuses(cloud, run_id):
    return [s.status for s in cloud.list_servers(run_id=run_id)]


# quotas -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor, count, resource", [
    ("m3.2xl", 3, "cores"),       # 192 cores > 150
    ("m3.tiny", 11, "instances"),  # 11 > 10
    ("r3.xl", 1, "cores"),        # 128 cores fit, but 1000 GB RAM would not either
])
def test_a_batch_over_quota_is_refused_whole_before_anything_exists(local_cloud, flavor, count, resource):
    who = owner()
    with pytest.raises(QuotaExceeded) as err:
        local_cloud.create_servers(ServerSpec("greedy", flavor, NOOP, count=count), who)
    assert "Quota exceeded" in str(err.value)
    assert local_cloud.list_servers() == []
    assert not any((local_cloud.home / "vms").iterdir())


def test_ram_quota_and_quota_counts_existing_servers(local_cloud):
    who = owner()
    with pytest.raises(QuotaExceeded, match="ram"):
        local_cloud.create_servers(ServerSpec("lm", "r3.large", NOOP, count=2), who)  # 1000 GB > 585
    local_cloud.create_servers(ServerSpec("some", "m3.tiny", NOOP, count=8), who)
    with pytest.raises(QuotaExceeded, match="instances: Requested 3, but already used 8 of 10"):
        local_cloud.create_servers(ServerSpec("more", "m3.tiny", NOOP, count=3), who)
    local_cloud.create_servers(ServerSpec("last", "m3.tiny", NOOP, count=2), who)
    assert len(local_cloud.list_servers(run_id=who.run_id)) == 10


def test_floating_ip_and_volume_quotas(local_cloud):
    configure(local_cloud, quotas=Quotas(instances=10, cores=150, ram_mb=585 * 1024, floating_ips=2,
                                         volumes=2, volume_gb=10))
    who = owner()
    local_cloud.create_floating_ip(who)
    local_cloud.create_floating_ip(who)
    with pytest.raises(QuotaExceeded, match="floating IPs"):
        local_cloud.create_floating_ip(who)
    local_cloud.create_volume("a", 8, who)
    with pytest.raises(QuotaExceeded, match="GB"):
        local_cloud.create_volume("b", 3, who)
    local_cloud.create_volume("b", 2, who)
    with pytest.raises(QuotaExceeded, match="volumes"):
        local_cloud.create_volume("c", 1, who)


def test_default_quotas_are_jetstream2_startup_research_cpu():
    quotas = LocalCloudOptions().quotas
    assert (quotas.cores, quotas.ram_mb, quotas.floating_ips, quotas.instances) == (150, 585 * 1024, 10, 10)


# capacity ---------------------------------------------------------------------------------------
def test_no_valid_host_puts_the_server_in_error_and_waiting_raises_capacity_error(local_cloud):
    configure(local_cloud, capacity=gpu_hosts(1, gpus=1))
    who = owner()
    first = local_cloud.create_servers(ServerSpec("half", "g3.large", NOOP, count=2), who)
    wait_for_servers(local_cloud, who.run_id, [s.id for s in first], timeout=10, poll_interval=0.05)
    (third,) = local_cloud.create_servers(ServerSpec("third", "g3.large", NOOP), who)  # the call succeeds
    assert third.status == S.ERROR and third.fault == NO_VALID_HOST
    with pytest.raises(CapacityError) as err:
        wait_for_servers(local_cloud, who.run_id, [third.id], timeout=10, poll_interval=0.05)
    assert "No valid host" in str(err.value)
    assert [s for s, _ in local_cloud.state_log(third.id)] == [S.BUILD, S.ERROR]


def test_a_batch_that_does_not_fit_goes_to_error_whole(local_cloud):
    configure(local_cloud, capacity=gpu_hosts(1, gpus=1))
    who = owner()
    batch = local_cloud.create_servers(ServerSpec("trio", "g3.large", NOOP, count=3), who)  # 2 would fit
    assert [s.status for s in batch] == [S.ERROR] * 3
    assert all(s.fault == NO_VALID_HOST for s in batch)
    # ERROR servers hold no host: the two that fit can be had now.
    pair = local_cloud.create_servers(ServerSpec("pair", "g3.large", NOOP, count=2), who)
    wait_for_servers(local_cloud, who.run_id, [s.id for s in pair], timeout=10, poll_interval=0.05)


def test_a_vgpu_slice_must_fit_on_one_gpu(local_cloud):
    configure(local_cloud, capacity=gpu_hosts(1, gpus=2))
    who = owner()
    larges = local_cloud.create_servers(ServerSpec("l", "g3.large", NOOP, count=3), who)
    assert all(s.status == S.BUILD for s in larges)
    local_cloud.delete_server(larges[0].id)  # now each GPU has half free: one GPU in total
    (xl,) = local_cloud.create_servers(ServerSpec("xl", "g3.xl", NOOP), who)
    assert xl.status == S.ERROR and xl.fault == NO_VALID_HOST
    smalls = local_cloud.create_servers(ServerSpec("s", "g3.small", NOOP, count=4), who)
    assert all(s.status == S.BUILD for s in smalls)  # 2 + 2 slices of 0.2 fit in the two halves


def test_stopped_servers_keep_their_host_shelved_ones_release_it(local_cloud):
    configure(local_cloud, capacity=gpu_hosts(1, gpus=1))
    who = owner()
    (a,) = local_cloud.create_servers(ServerSpec("a", "g3.xl", NOOP), who)
    wait_for_servers(local_cloud, who.run_id, [a.id], timeout=10, poll_interval=0.05)
    local_cloud.stop_server(a.id)
    (b,) = local_cloud.create_servers(ServerSpec("b", "g3.xl", NOOP), who)
    assert b.status == S.ERROR  # SHUTOFF still holds the GPU (and half the SUs)
    local_cloud.shelve_server(a.id)
    (c,) = local_cloud.create_servers(ServerSpec("c", "g3.xl", NOOP), who)
    assert c.status == S.BUILD  # shelving gave the GPU back
    with pytest.raises(CapacityError):
        local_cloud.unshelve_server(a.id)
    assert local_cloud.get_server(a.id).status == S.SHELVED_OFFLOADED  # it stays shelved
    local_cloud.delete_server(c.id)
    local_cloud.unshelve_server(a.id)
    wait_for_servers(local_cloud, who.run_id, [a.id], timeout=10, poll_interval=0.05)


def test_large_memory_and_general_hosts_only_take_their_families(local_cloud):
    configure(local_cloud, quotas=BIG_QUOTA, capacity=(
        HostGroup("general", 1, vcpus=8, ram_mb=64 * 1024, families=("m3",)),
        HostGroup("large-memory", 1, vcpus=128, ram_mb=1000 * 1024, families=("r3",)),
        *gpu_hosts(2, gpus=4),
    ))
    who = owner()
    lm = local_cloud.create_servers(ServerSpec("lm", "r3.large", NOOP, count=2), who)
    assert [s.status for s in lm] == [S.BUILD, S.BUILD]
    (xl,) = local_cloud.create_servers(ServerSpec("lmxl", "r3.xl", NOOP), who)
    assert xl.status == S.ERROR
    (m,) = local_cloud.create_servers(ServerSpec("m", "m3.medium", NOOP), who)
    assert m.status == S.BUILD
    (m2,) = local_cloud.create_servers(ServerSpec("m2", "m3.tiny", NOOP), who)
    assert m2.status == S.ERROR  # the GPU hosts have room, but m3 does not run there


def test_placement_packs_slices_and_is_all_or_nothing():
    hosts = build_hosts(gpu_hosts(1, gpus=2), [])
    placed = place_all(hosts, [FLAVORS["g3.medium"]] * 4 + [FLAVORS["g3.xl"]])
    assert [p.gpu_slot for p in placed] == [0, 0, 0, 0, 1]
    assert place_all(hosts, [FLAVORS["g3.small"]]) is None  # both GPUs full
    fresh = build_hosts(gpu_hosts(1, gpus=1), [])
    assert place_all(fresh, [FLAVORS["g3.small"]] * 6) is None
    assert place_all(fresh, [FLAVORS["g3.small"]] * 5) is not None
    assert place_all(build_hosts(gpu_hosts(), []), [FLAVORS["g3.small"]], never=["g3"]) is None
