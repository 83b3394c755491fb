"""Fixtures shared by every test suite.

``local_cloud``: a LocalCloud of its own in the test's tmp_path, booting in 0.2 s. Afterwards it
is reset, and the test fails if any process of it (guest, sshd, user_data) is still running —
the local equivalent of proving destruction after every provisioning test.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slipstream.cloud.local import LocalCloud, LocalCloudOptions
from slipstream.cloud.local.processes import HOME_MARKER, processes_with

FAST_BOOT = 0.2


def local_cloud_processes(home: Path) -> set[int]:
    """Pids of running processes that belong to the LocalCloud at ``home``: those carrying its
    marker, and those naming it on their command line (sshd overwrites its environment)."""
    found = {pid for pid, _ in processes_with(HOME_MARKER, str(home))}
    needle = str(home).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.add(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture
def local_cloud(tmp_path) -> Iterator[LocalCloud]:
    # A /24 of its own inside 127.64.0.0/16, away from the .0.x a default LocalCloud hands out
    # first, so tests and a LocalCloud in use on this machine (or another test run) rarely meet.
    network = f"127.64.{random.randint(100, 249)}.0/24"
    cloud = LocalCloud(options=LocalCloudOptions(home=tmp_path / "localcloud", boot_delay=FAST_BOOT,
                                                 stop_grace=1.0, network=network))
    yield cloud
    cloud.reset()
    deadline = time.monotonic() + 10
    while left := local_cloud_processes(cloud.home):
        if time.monotonic() > deadline:
            pytest.fail(f"LocalCloud processes still running after reset(): {sorted(left)}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server (SQLite) for one test module; yields its API URL.

    Module scope, not session: each module gets an empty server, so blocks, events and artifacts
    one module saves never leak into another's assertions. Use it with
    ``pytestmark = pytest.mark.usefixtures("prefect_harness")``.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def cloud_env(local_cloud, monkeypatch, tmp_path) -> LocalCloud:
    """Flows called with ``cloud="local"`` use this test's LocalCloud and a private slipstream home,
    and run in ``tmp_path`` (so their default ``results/<run id>/`` lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIPSTREAM_LOCAL_HOME", str(local_cloud.home))
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "slipstream"))
    return local_cloud
