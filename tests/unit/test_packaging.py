"""The package a user installs: every folder of code ships, under the slipstream namespace."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_installed_under_the_slipstream_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "slipstream").rglob("__init__.py")}
    for name, folder in mapped.items():
        on_disk |= {".".join((name, *init.parent.relative_to(folder).parts)) for init in folder.rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set()


def test_a_users_own_tasks_and_flows_modules_do_not_shadow_slipstreams(tmp_path):
    # A researcher's project often has its own tasks.py; before, `from flows.vm_job import vm_job`
    # then failed with "'tasks' is not a package".
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise SystemExit('the user flows/ was imported')\n")
    (tmp_path / "blocks.py").write_text("raise SystemExit('the user blocks.py was imported')\n")
    script = "from slipstream.flows.vm_job import vm_job, gpu_job; print(vm_job.name, gpu_job.name)"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["vm-job", "gpu-job"]
