"""What a run shows: vm_job on the local cloud under Prefect's test harness publishes its
resources, cost, teardown proof and burn chart as artifacts, and `slipstream report RUN_ID` (the
real CLI, in a subprocess, with no Prefect reachable) writes the same figures to files."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from PIL import Image

from slipstream.cost.accounting import meter_servers

PIPELINE = "report-it"


pytestmark = pytest.mark.usefixtures("prefect_harness")


def _artifacts(run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        of_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
        found = client.read_artifacts(artifact_filter=of_run)
    return {a.key: a for a in found}


def _png_size(png: bytes) -> tuple[int, int]:
    Image.open(io.BytesIO(png)).verify()
    return Image.open(io.BytesIO(png)).size


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens: proves no Prefect is needed
    slipstream = Path(sys.executable).parent / "slipstream"
    return subprocess.run([str(slipstream), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_run_publishes_its_burn_chart_and_the_cli_writes_the_same_figures(cloud_env, tmp_path):
    from slipstream.flows.vm_job import vm_job

    result = vm_job(flavor="m3.small", command="echo working; sleep 1", pipeline=PIPELINE)
    assert result.teardown_clean
    history = cloud_env.server_history(result.run_id)
    metered = meter_servers(cloud_env, [(h.id, h.name, h.flavor) for h in history])
    assert [m.su for m in result.metered] == pytest.approx([m.su for m in metered])

    # The run's artifacts, read back through the Prefect API.
    artifacts = _artifacts(result.run_id)
    assert {f"{PIPELINE}-{what}" for what in ("resources", "cost", "teardown-proof", "burn-chart")} <= set(artifacts)
    chart = artifacts[f"{PIPELINE}-burn-chart"]
    assert chart.type == "markdown"
    png = base64.b64decode(re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", chart.data).group(1))
    assert _png_size(png) == (960, 540)
    assert f"Spent **{result.su_spent:.4f} SU** of a worst case of **{result.su_estimated:.2f} SU**" in chart.data
    cost = json.loads(artifacts[f"{PIPELINE}-cost"].data)
    total = next(row for row in cost if row["server"] == "TOTAL")
    assert total["su_spent"] == pytest.approx(sum(m.su for m in metered), abs=1e-5)
    assert total["su_estimated"] == pytest.approx(result.su_estimated, abs=1e-5)
    assert "clean" in artifacts[f"{PIPELINE}-teardown-proof"].data
    kept = Path(os.environ["SLIPSTREAM_HOME"]) / "reports" / result.run_id
    assert (kept / "burn.png").read_bytes() == png

    # The same report from the command line, into ./slipstream-report-<run id> by default.
    done = _cli("report", result.run_id[:12], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {result.run_id} ({PIPELINE}) on local" in done.stdout
    assert "teardown: clean" in done.stdout
    out = tmp_path / f"slipstream-report-{result.run_id}"
    rows = list(csv.DictReader((out / "cost.csv").open()))
    assert [r["flavor"] for r in rows[:-1]] == ["m3.small"]
    assert float(rows[-1]["su_estimated"]) == pytest.approx(result.su_estimated)
    assert float(rows[-1]["su_spent"]) == pytest.approx(result.su_spent, abs=1e-7)
    resources = list(csv.DictReader((out / "resources.csv").open()))
    assert {r["kind"] for r in resources} == {"server", "keypair", "floating_ip"}
    assert {r["state"] for r in resources} == {"deleted"}
    assert "**Clean**" in (out / "teardown.md").read_text()
    assert _png_size((out / "burn.png").read_bytes()) == (960, 540)

    # Nothing of the run is left on the cloud.
    assert cloud_env.list_servers() == [] and cloud_env.list_keypairs() == [] and cloud_env.list_floating_ips() == []


def test_the_cli_explains_an_unknown_run_id(cloud_env, tmp_path):
    done = _cli("report", "no-such-run", cwd=tmp_path)
    assert done.returncode == 2
    assert "no run 'no-such-run'" in done.stdout and "slipstream ls" in done.stdout
    assert not list(tmp_path.glob("slipstream-report-*"))  # nothing written
