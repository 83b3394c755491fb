"""The demo: a small real pipeline on the embedded local cloud, start to finish.

A g3.medium VM (an A100 vGPU slice on Jetstream2; a process on this machine here) boots, gets a
numpy computation over SSH, hands the result back, and everything is deleted. ``make demo`` runs
it through ``slipstream demo``, which adds a progress bar and the cost table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from slipstream.flows.vm_job import VmJobResult, vm_job

DEMO_SCRIPT = '''\
"""Estimate pi and the spectrum of a random symmetric matrix: a stand-in for real work."""
import json, platform
import numpy as np

rng = np.random.default_rng(42)
points = rng.random((2_000_000, 2))
pi = 4 * np.mean((points ** 2).sum(axis=1) <= 1.0)
a = rng.standard_normal((400, 400))
eig = np.linalg.eigvalsh((a + a.T) / 2)
result = {"pi_estimate": round(float(pi), 5), "largest_eigenvalue": round(float(eig[-1]), 4),
          "numpy": np.__version__, "host": platform.node()}
json.dump(result, open("result.json", "w"), indent=2)
print(json.dumps(result))
'''


@flow(name="slipstream-demo")
def demo(cloud: str = "local", results_dir: str = "results/demo") -> VmJobResult:
    """Run the demo computation on a g3.medium and bring ``result.json`` back."""
    with tempfile.TemporaryDirectory(prefix="slipstream-demo-") as tmp:
        script = Path(tmp) / "compute.py"
        script.write_text(DEMO_SCRIPT)
        return vm_job(
            flavor="g3.medium", script=str(script), outputs=["result.json"], name="demo",
            cloud=cloud, max_hours=0.25, results_dir=results_dir, pipeline="demo",
        )


def run_with_progress(console) -> int:
    """Run :func:`demo` with a progress bar, then show what was created, what it cost and the
    teardown proof. Returns a process exit code."""
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from slipstream import progress

    bar = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), console=console, transient=False)
    tasks: dict[str, int] = {}

    def on_report(stage: str, done: int, total: int, detail: str) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, detail="")
        bar.update(tasks[stage], completed=done, total=total, detail=detail[:60])

    console.print("[bold]slipstream demo[/bold]: a g3.medium on the embedded local cloud runs a numpy job over SSH")
    with bar, progress.reporting_to(on_report):
        result = demo()

    table = Table(title="created by this run (all deleted)")
    for col in ("kind", "name", "detail"):
        table.add_column(col)
    for r in result.resources:
        table.add_row(str(r.kind), r.name, r.detail)
    console.print(table)
    cost = Table(title="cost at Jetstream2 rates")
    for col in ("server", "flavor", "active s", "SU"):
        cost.add_column(col)
    for m in result.metered:
        cost.add_row(m.name, m.flavor, f"{m.hours_active * 3600:.1f}", f"{m.su:.4f}")
    cost.add_row("total", "", "", f"{result.su_spent:.4f}  (worst case planned: {result.su_estimated:.2f})")
    console.print(cost)
    for out in result.outputs:
        console.print(f"[bold]{out}[/bold]: {json.dumps(json.loads(open(out).read()))}")
    remaining = ", ".join(f"{k}: {len(v)}" for k, v in result.teardown_remaining.items())
    verdict = "[green]clean[/green]" if result.teardown_clean else "[red]INCOMPLETE[/red]"
    console.print(f"teardown proof for run {result.run_id}: {verdict} ({remaining} remaining)")
    return 0 if result.teardown_clean and result.exit_status == 0 else 1
