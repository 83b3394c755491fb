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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[object]:
    """One temporary Prefect server (SQLite) for the whole session, started on first use.

    Starting one takes 15-35 s on a 2-core machine, and some twenty modules use one: a server
    per module cost the suite about ten minutes. Tests therefore read back only what their own
    runs wrote (filter by flow run, or by a run id in an event's resource)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from prefect.testing.utilities import _find_available_port

    database = tmp_path_factory.mktemp("prefect-server") / "prefect.db"
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{database}"}):
        server = SubprocessASGIServer(port=_find_available_port())  # the child takes its settings now
        server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prefect_harness(prefect_server) -> Iterator[str]:
    """Point Prefect at the session's temporary server for one test module; yields its API URL.

    What prefect_test_harness does, less the server start: the API URL is set for this module
    only (tests after it see no Prefect, as before), and the log and event lines still queued
    are sent before the module ends. The blocks the module saved are deleted then, as a server of
    its own would have forgotten them: the reaper reaps every saved cloud it finds. Use it with
    ``pytestmark = pytest.mark.usefixtures("prefect_harness")``.
    """
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Code that would start a temporary server of its own during a run finds this one instead.
    prior_default = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = prefect_server
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}), \
                _temporary_global_settings_context(get_settings_context()):
            blocks_before = _saved_blocks()
            yield prefect_server.api_url
            APILogHandler().flush()
            EventsWorker.drain_all(timeout=30)
            _delete_blocks(_saved_blocks() - blocks_before)
    finally:
        if prior_default is None:
            SubprocessASGIServer._instances.pop(None, None)
        else:
            SubprocessASGIServer._instances[None] = prior_default


def _saved_blocks() -> set:
    from prefect.client.orchestration import get_client

    from support import every_page

    with get_client(sync_client=True) as client:
        return {doc.id for doc in every_page(client.read_block_documents, include_secrets=False)}


def _delete_blocks(ids: set) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for block_id in ids:
            client.delete_block_document(block_id)


@pytest.fixture
def cloud_env(local_cloud, monkeypatch, tmp_path) -> LocalCloud:
    """Flows called with ``cloud="local"`` use this test's LocalCloud and a private slipstream home,
    and run in ``tmp_path`` (so their default ``results/<run id>/`` lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIPSTREAM_LOCAL_HOME", str(local_cloud.home))
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "slipstream"))
    return local_cloud
