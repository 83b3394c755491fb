"""A run's report from the ledger and the cloud: what a researcher checks after a run, on real
LocalCloud VMs (no-op guests) held by a real Lease."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image
from support import owner, wait_until

from slipstream.cost.accounting import meter_servers
from slipstream.cli import main
from slipstream.cloud.errors import InvalidRequest, NotFound
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger
from slipstream.cost.reports import gather_run_report, reports_dir, write_report_files


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "home"))
    return Ledger()


def _active(cloud, run_id, count):
    def active() -> bool:
        return len([s for s in cloud.list_servers(run_id=run_id) if s.status == ServerStatus.ACTIVE]) == count

    return wait_until(active, what=f"{count} servers ACTIVE")


def _finished_run(cloud, ledger, worst_case: float | None = 2.0):
    """A run of two m3.tiny and a keypair, one server stopped half-way, then torn down."""
    o = owner("report")
    with Lease(cloud, o, ledger=ledger) as lease:
        servers = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop", count=2))
        lease.create_keypair("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGf1test report")
        _active(cloud, o.run_id, 2)
        cloud.stop_server(servers[1].id)
        wait_until(lambda: cloud.get_server(servers[1].id).status == ServerStatus.SHUTOFF, what="w-2 SHUTOFF")
    if worst_case is not None:
        ledger.record_worst_case(o.run_id, o.pipeline, cloud.name, worst_case)
    return o, servers


def test_a_finished_run_reports_every_resource_its_cost_and_a_clean_teardown(local_cloud, ledger, tmp_path):
    o, servers = _finished_run(local_cloud, ledger)
    report = gather_run_report(local_cloud, o.run_id, ledger=ledger)

    assert report.clean and local_cloud.list_servers(run_id=o.run_id) == []
    assert sorted((r.kind, r.state) for r in report.resources) == [
        ("keypair", "deleted"), ("server", "deleted"), ("server", "deleted")]
    expected = meter_servers(local_cloud, [(s.id, s.name, "m3.tiny") for s in servers])
    assert [(s.name, s.su_spent) for s in report.servers] == [(m.name, pytest.approx(m.su)) for m in expected]
    assert report.su_spent == pytest.approx(sum(m.su for m in expected)) and report.su_spent > 0
    assert report.curve.spent == pytest.approx(report.su_spent)  # the chart ends where the table does
    # The worst case is split by SU rate: two m3.tiny take half each.
    assert [s.su_estimated for s in report.servers] == [1.0, 1.0]

    paths = write_report_files(report, tmp_path / "out")
    assert [p.name for p in paths] == ["resources.csv", "cost.csv", "teardown.md", "burn.png"]
    cost = list(csv.DictReader((tmp_path / "out" / "cost.csv").open()))
    assert [row["server"] for row in cost] == ["w-1", "w-2", "TOTAL"]
    assert float(cost[-1]["su_estimated"]) == 2.0
    assert float(cost[-1]["su_spent"]) == pytest.approx(report.su_spent, abs=1e-8)
    resources = list(csv.DictReader((tmp_path / "out" / "resources.csv").open()))
    assert {r["id"] for r in resources} >= {s.id for s in servers}
    assert all(r["deleted_at"] for r in resources)
    teardown = (tmp_path / "out" / "teardown.md").read_text()
    assert "**Clean**" in teardown and f"run {o.run_id}" in teardown
    assert Image.open(io.BytesIO((tmp_path / "out" / "burn.png").read_bytes())).size == (960, 540)


def test_a_live_run_shows_what_remains_until_it_is_torn_down(local_cloud, ledger, tmp_path):
    o = owner("report")
    with Lease(local_cloud, o, ledger=ledger) as lease:
        lease.create_servers(ServerSpec("live", "m3.tiny", "slipstream-noop"))
        _active(local_cloud, o.run_id, 1)
        report = gather_run_report(local_cloud, o.run_id, ledger=ledger)
        assert not report.clean and report.remaining["server"] == ["live"]
        assert report.servers[0].su_spent > 0  # charged up to now
        assert "worst case was not recorded" in " ".join(report.notes)
        write_report_files(report, tmp_path / "live")
        assert "**Not clean**" in (tmp_path / "live" / "teardown.md").read_text()
        assert "slipstream reap --yes" in (tmp_path / "live" / "teardown.md").read_text()
    assert gather_run_report(local_cloud, o.run_id, ledger=ledger).clean


def test_a_run_that_failed_before_creating_anything_still_reports(local_cloud, ledger, tmp_path):
    from slipstream.cloud.errors import TransientError

    o = owner("report")
    ledger.record_worst_case(o.run_id, o.pipeline, local_cloud.name, 16.0)
    local_cloud.fail_next("create_servers", 1)
    with pytest.raises(TransientError), Lease(local_cloud, o, ledger=ledger) as lease:
        lease.create_servers(ServerSpec("never", "g3.medium", "slipstream-noop"))
    report = gather_run_report(local_cloud, o.run_id, ledger=ledger)
    assert report.clean and report.servers == [] and report.su_spent == 0 and report.worst_case_su == 16.0
    assert report.pipeline == "report"
    write_report_files(report, tmp_path / "empty")
    assert Image.open(tmp_path / "empty" / "burn.png").size == (960, 540)


def test_a_unique_prefix_names_the_run_and_an_ambiguous_one_is_refused(local_cloud, ledger):
    o, _ = _finished_run(local_cloud, ledger, worst_case=None)
    assert gather_run_report(local_cloud, o.run_id[:7], ledger=ledger).run_id == o.run_id
    ledger.record_pending(o.run_id[:7] + "zzz", "other", local_cloud.name, "keypair", ["k"])
    with pytest.raises(InvalidRequest, match="ambiguous.*Give more characters"):
        gather_run_report(local_cloud, o.run_id[:7], ledger=ledger)


def test_an_unknown_run_says_how_to_find_run_ids(local_cloud, ledger):
    o, _ = _finished_run(local_cloud, ledger)
    expected = f"no run 'nosuchrun' in the ledger.*slipstream ls.*Recent runs in the ledger: {o.run_id}"
    with pytest.raises(NotFound, match=expected):
        gather_run_report(local_cloud, "nosuchrun", ledger=ledger)


def test_a_run_recorded_on_another_cloud_names_that_cloud(local_cloud, ledger):
    ledger.record_pending("elsewhere1", "vm-job", "openstack:IU", "server", ["w"])
    with pytest.raises(InvalidRequest, match="recorded on openstack:IU, not on local.*--cloud"):
        gather_run_report(local_cloud, "elsewhere1", ledger=ledger)


def test_the_cli_writes_the_files_and_refuses_an_unknown_run(local_cloud, ledger, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIPSTREAM_LOCAL_HOME", str(local_cloud.home))
    o, _ = _finished_run(local_cloud, ledger)
    assert main(["report", o.run_id[:8], "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert f"run {o.run_id} (report) on local" in printed and "teardown: clean" in printed
    written = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert written == ["burn.png", "cost.csv", "resources.csv", "teardown.md"]
    assert main(["report", "nosuchrun"]) == 2
    assert "slipstream ls" in capsys.readouterr().out


def test_report_files_live_under_slipstream_home(ledger, tmp_path):
    assert reports_dir("abc") == tmp_path / "home" / "reports" / "abc"
