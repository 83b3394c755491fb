"""SU arithmetic at Jetstream2 rates: what a researcher would check against the docs."""

from datetime import UTC, datetime, timedelta

import pytest

from slipstream.cost.accounting import PlannedServers, estimate, meter
from slipstream.cloud.models import ServerStatus
from slipstream.jetstream2 import FLAVORS, su_per_hour

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("flavor", "per_hour"),
    [("m3.tiny", 1), ("m3.quad", 4), ("m3.large", 16), ("r3.large", 128), ("r3.xl", 256),
     ("g3.medium", 16), ("g3.large", 32), ("g3.xl", 64)],
)
def test_hourly_rates_match_the_jetstream2_flavour_table(flavor, per_hour):
    assert su_per_hour(FLAVORS[flavor]) == per_hour


def test_state_fractions_match_jetstream2_charging_policy():
    m3 = FLAVORS["m3.medium"]  # 8 SU/h when ACTIVE
    assert su_per_hour(m3, ServerStatus.SUSPENDED) == 6
    assert su_per_hour(m3, ServerStatus.SHUTOFF) == 4
    assert su_per_hour(m3, ServerStatus.SHELVED_OFFLOADED) == 0


def test_estimate_is_every_server_active_for_the_whole_walltime():
    plan = [PlannedServers(FLAVORS["g3.large"], count=2, hours=3), PlannedServers(FLAVORS["m3.small"], 1, 3)]
    assert estimate(plan) == 2 * 32 * 3 + 2 * 3


def test_meter_charges_each_interval_at_its_state_and_a_shelved_vm_nothing():
    log = [
        (ServerStatus.BUILD, at(0)),
        (ServerStatus.ACTIVE, at(1)),  # 60 min active
        (ServerStatus.SHELVED_OFFLOADED, at(61)),  # 4 h shelved: free
        (ServerStatus.ACTIVE, at(301)),  # 30 min active
        (ServerStatus.SHUTOFF, at(331)),  # 60 min stopped: half price
        (ServerStatus.DELETED, at(391)),
    ]
    g3m = FLAVORS["g3.medium"]  # 16 SU/h
    assert meter(g3m, log, until=at(10_000)) == pytest.approx(16 * 1.5 + 8 * 1)


def test_meter_runs_the_last_state_until_now_when_not_deleted():
    log = [(ServerStatus.ACTIVE, at(0))]
    assert meter(FLAVORS["m3.tiny"], log, until=at(90)) == pytest.approx(1.5)


def test_unknown_family_has_no_rate_and_says_which_exist():
    from slipstream.cloud.models import Flavor

    with pytest.raises(ValueError, match="known families: g3, g4, g5, m3, r3"):
        su_per_hour(Flavor("x9.huge", 4, 1024, 10))


def _server(name: str, flavor: str, status: ServerStatus):
    from slipstream.cloud.models import Server

    return Server(id=name, name=name, status=status, flavor=flavor, image="Featured-Ubuntu24")


def test_burn_rate_is_what_the_held_servers_cost_per_hour_in_their_states():
    from slipstream.cost.accounting import burn_rate

    servers = [
        _server("train", "g3.large", ServerStatus.ACTIVE),  # 32 SU/h
        _server("idle", "m3.medium", ServerStatus.SHUTOFF),  # 8 SU/h at half price
        _server("parked", "r3.large", ServerStatus.SHELVED_OFFLOADED),  # nothing
        _server("booting", "m3.quad", ServerStatus.BUILD),  # nothing yet
    ]
    assert burn_rate(servers) == 32 + 4


def test_burn_rate_names_a_flavour_without_a_rate():
    from slipstream.cost.accounting import burn_rate

    with pytest.raises(ValueError, match="server odd has flavour 'x9.huge'"):
        burn_rate([_server("odd", "x9.huge", ServerStatus.ACTIVE)])


def test_run_burn_rate_on_the_local_cloud_follows_stop_and_shelve(local_cloud, tmp_path):
    from support import owner

    from slipstream.cost.accounting import run_burn_rate
    from slipstream.cloud.models import ServerSpec
    from slipstream.cloud.waiting import wait_for_servers
    from slipstream.ownership.lease import Lease
    from slipstream.ownership.ledger import Ledger

    who = owner("burn")

    def wait(status: ServerStatus) -> None:
        wait_for_servers(local_cloud, who.run_id, [server.id], status=status, timeout=30, poll_interval=0.05)

    with Lease(local_cloud, who, ledger=Ledger(tmp_path / "ledger.db")) as lease:
        (server,) = lease.create_servers(ServerSpec("burn", "m3.medium", "slipstream-noop"))
        wait(ServerStatus.ACTIVE)
        assert run_burn_rate(local_cloud, who.run_id) == 8
        local_cloud.stop_server(server.id)
        wait(ServerStatus.SHUTOFF)
        assert run_burn_rate(local_cloud, who.run_id) == 4
        local_cloud.shelve_server(server.id)
        wait(ServerStatus.SHELVED_OFFLOADED)
        assert run_burn_rate(local_cloud, who.run_id) == 0
    assert lease.proof.clean and local_cloud.list_servers(run_id=who.run_id) == []
