"""`slipstream runs`: recent runs with their cost and teardown state, from the ledger alone."""

from __future__ import annotations

from slipstream.cli import main
from slipstream.cost.reports import reports_dir
from slipstream.ownership.ledger import Ledger


def test_runs_lists_recent_runs_newest_first_with_cost_and_teardown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ledger = Ledger()
    (server, key) = ledger.record_pending("run-clean-000001", "gpu-job", "local", "server", ["gpu-job", "k"])
    ledger.record_created(server, "srv-1")
    ledger.record_created(key, "key-1")
    ledger.record_deleted("local", "server", "srv-1")
    ledger.record_deleted("local", "server", "key-1")
    ledger.record_worst_case("run-clean-000001", "gpu-job", "local", 16.0)
    report = reports_dir("run-clean-000001")
    report.mkdir(parents=True)
    (report / "cost.csv").write_text("server,server_id,flavor,su_estimated,su_spent,hours_active\n"
                                     "TOTAL,,,16.00000000,0.02035500,\n")
    (left,) = ledger.record_pending("run-leaky-000002", "vm-job", "local", "server", ["vm-job"])
    ledger.record_created(left, "srv-2")

    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "run-" in line]
    assert "run-leaky-00" in lines[0] and "run-clean-00" in lines[1]  # newest first
    assert "gpu-job on local" in lines[1] and "0.0204 / 16.00" in lines[1] and "clean (2 deleted)" in lines[1]
    assert "1 left: server" in lines[0] and "?" in lines[0]
    assert f"{tmp_path / 'home' / 'reports'}" in out


def test_runs_on_an_empty_ledger_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "home"))
    assert main(["runs"]) == 0
    assert "no runs recorded in" in capsys.readouterr().out
