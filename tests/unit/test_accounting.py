"""SU arithmetic at Jetstream2 rates: what a researcher would check against the docs."""

from datetime import UTC, datetime, timedelta

import pytest

from slipstream.accounting import PlannedServers, estimate, meter
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
