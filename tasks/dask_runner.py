"""Prefect's DaskTaskRunner on a :class:`~slipstream.dask_cluster.CloudDaskCluster`, shipping workers
only what they need.

prefect-dask sends every task to its worker with the flow's context: the settings (Prefect's API
key among them, in clear text) and the flow object, whose task runner carries the cluster's
arguments (the cloud provider and its credentials). :class:`CloudDaskTaskRunner` submits with
every secret setting removed (the API key and auth string, the server's database password…) and the flow's runner replaced by the scheduler's address,
over the cluster's mutual TLS. Tasks on the workers still report to the Prefect API URL; a
Prefect server that requires a key should be given to the workers by their own means.

    from prefect import flow, task
    from slipstream.tasks.dask_runner import CloudDaskTaskRunner

    @flow(task_runner=CloudDaskTaskRunner(cluster_kwargs={"cloud": "local", "scaling": {"max_workers": 4}},
                                          adapt_kwargs={"minimum": 0, "maximum": 4}))
    def my_flow(): ...

On images without Prefect the workers get ``prefect`` and ``prefect-dask`` at this process's
versions (added to ``worker_packages``), plus what ``cluster_kwargs["worker_packages"]`` lists:
the package your tasks live in must be installable there too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any

import prefect
import prefect_dask
from prefect.context import FlowRunContext, SettingsContext
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, SecretStr

CLUSTER_CLASS = "slipstream.dask_cluster.CloudDaskCluster"

#: What a Prefect task on a fresh worker image needs to run at all.
PREFECT_WORKER_PACKAGES: tuple[str, ...] = (f"prefect=={prefect.__version__}",
                                            f"prefect-dask=={prefect_dask.__version__}")


class CloudDaskTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner whose cluster is a CloudDaskCluster (see the module docstring)."""

    def __init__(self, cluster: Any = None, address: str | None = None, cluster_class: Any = CLUSTER_CLASS,
                 cluster_kwargs: dict[str, Any] | None = None, adapt_kwargs: dict[str, Any] | None = None,
                 client_kwargs: dict[str, Any] | None = None, performance_report_path: str | None = None) -> None:
        if cluster is not None or address:
            cluster_class, cluster_kwargs = None, None  # duplicate() on a worker: connect, never create
        elif cluster_kwargs is not None or cluster_class == CLUSTER_CLASS:
            cluster_kwargs = dict(cluster_kwargs or {})
            extra = tuple(cluster_kwargs.get("worker_packages", ()))
            cluster_kwargs["worker_packages"] = (*[p for p in PREFECT_WORKER_PACKAGES if p not in extra], *extra)
        super().__init__(cluster=cluster, address=address, cluster_class=cluster_class,
                         cluster_kwargs=cluster_kwargs, adapt_kwargs=adapt_kwargs, client_kwargs=client_kwargs,
                         performance_report_path=performance_report_path)
        self._flow_for_workers: tuple[Any, Any] | None = None

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        with self._context_for_workers():
            return super().submit(task, parameters, wait_for, dependencies)

    @contextmanager
    def _context_for_workers(self):
        """While prefect-dask serialises the context for a task (secrets included, in clear): no
        secret setting at all (the API key and auth string, the server's auth string, database
        password and connection URL…), and a flow whose task runner is only the scheduler's address."""
        with ExitStack() as stack:
            settings = SettingsContext.get()
            if settings is not None:
                stack.enter_context(SettingsContext(profile=settings.profile,
                                                    settings=_without_secrets(settings.settings)))
            run = FlowRunContext.get()
            if run is not None and run.flow is not None and run.task_runner is self:
                stack.enter_context(run.model_copy(update={"flow": self._worker_flow(run.flow)}))
            yield

    def _worker_flow(self, flow):
        if self._flow_for_workers is None or self._flow_for_workers[0] is not flow:
            address = self.client.scheduler.address
            self._flow_for_workers = (flow, flow.with_options(task_runner=DaskTaskRunner(address=address)))
        return self._flow_for_workers[1]


def _without_secrets(model: BaseModel) -> BaseModel:
    """A copy of a settings model with every secret field (pydantic ``SecretStr``), at any depth, unset."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            updates[name] = None
        elif isinstance(value, BaseModel) and (cleaned := _without_secrets(value)) is not value:
            updates[name] = cleaned
    return model.model_copy(update=updates) if updates else model
