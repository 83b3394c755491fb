"""CloudDaskTaskRunner under real Prefect (test harness) on LocalCloud VMs: the README's snippet runs
as written, and Prefect's API key and the cluster's arguments never reach a worker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_dask_snippet() -> str:
    section = README.read_text().split("## Elastic Dask", 1)[1]
    return next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "CloudDaskTaskRunner" in b)


def test_the_readmes_dask_snippet_runs_as_written(cloud_env):
    printed = []
    exec(compile(readme_dask_snippet(), "README.md (Elastic Dask)", "exec"),
         {"__name__": "readme_snippet", "print": lambda *a: printed.append(a)})
    assert printed == [([0, 1, 4, 9],)]
    assert cloud_env.list_servers() == []


def test_prefects_api_key_and_the_clusters_arguments_stay_off_the_workers(cloud_env):
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect.settings import (
        PREFECT_API_KEY,
        PREFECT_SERVER_API_AUTH_STRING,
        PREFECT_SERVER_DATABASE_PASSWORD,
        get_current_settings,
        temporary_settings,
    )

    from slipstream.tasks.dask_runner import CloudDaskTaskRunner

    @task
    def what_the_worker_sees() -> dict:
        import distributed

        runner = FlowRunContext.get().flow.task_runner
        settings = get_current_settings()
        secrets = [settings.server.api.auth_string, settings.server.database.password,
                   settings.server.database.connection_url]
        return {"api_key": settings.api.key, "secrets": [s.get_secret_value() for s in secrets if s is not None],
                "on_a_worker": distributed.get_worker().name,
                "cluster_kwargs": getattr(runner, "cluster_kwargs", None), "address": runner.address}

    runner = CloudDaskTaskRunner(cluster_kwargs={"cloud": "local", "image": "slipstream-noop",
                                                 "scaling": {"max_workers": 1, "flavor": "m3.small"}},
                                 adapt_kwargs={"minimum": 0, "maximum": 1})

    @flow(task_runner=runner)
    def probe() -> dict:
        return what_the_worker_sees.submit().result()

    # A host that also serves Prefect has its server's secrets in the same settings.
    with temporary_settings({PREFECT_API_KEY: "pnu_not_for_the_workers", PREFECT_SERVER_API_AUTH_STRING: "admin:s3cret",
                             PREFECT_SERVER_DATABASE_PASSWORD: "db-s3cret"}):
        seen = probe()
    assert seen["on_a_worker"].startswith("dask-")
    assert seen["api_key"] is None
    assert not [s for s in seen["secrets"] if "s3cret" in s], seen["secrets"]
    assert not seen["cluster_kwargs"] and seen["address"].startswith("tls://")
    assert cloud_env.list_servers() == []
