"""What one run held, what it cost, and what is left of it: the report behind ``slipstream report``
and the run's Prefect artifacts.

Gathered from two sources, neither of which needs Prefect:

- the ledger (``$SLIPSTREAM_HOME/ledger.db``): every resource the run's Lease created, when, and
  when it was deleted; the run's planned worst case and its servers' flavours (recorded when the
  run reports, because Nova forgets the flavour of a deleted server);
- the cloud: each server's state log, which the SU meter reads (it stays readable after
  deletion), and a fresh listing by run id of everything still tagged with the run.

::

    report = gather_run_report(LocalCloud(), "989756c5")    # a unique prefix is enough
    write_report_files(report, Path("slipstream-report-989756c5"))
    # -> resources.csv, cost.csv (SU estimated vs spent per server), teardown.md, burn.png

The SU figures are :func:`slipstream.cost.accounting.meter_log`'s, and the burn chart is built
with the same meter, so the table, the chart and the flow's own result always agree.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from slipstream.cost.accounting import MeteredServer, meter_log
from slipstream.cost.burnchart import BurnCurve, ServerUsage, burn_curve, render_burn_chart
from slipstream.cloud.errors import CloudError, InvalidRequest, NotFound
from slipstream.cloud.models import Flavor, Ownership, ServerStatus
from slipstream.cloud.port import CloudProvider
from slipstream.jetstream2 import FLAVORS, su_per_hour
from slipstream.ownership.lease import Lease, ResourceKind
from slipstream.ownership.ledger import Ledger
from slipstream.paths import slipstream_home

REPORT_FILES = ("resources.csv", "cost.csv", "teardown.md", "burn.png")

_FIND_RUNS = ("A run id is the Prefect flow-run id (Prefect UI, `prefect flow-run ls`); "
              "`slipstream ls` lists the runs that hold resources now (first 12 characters are enough).")


@dataclass(frozen=True)
class ReportedResource:
    """One resource of the run. ``state``: created, deleted or pending (the ledger's word), or
    ``on cloud, not in ledger`` for something tagged with the run that the ledger never saw."""

    kind: str
    name: str
    id: str
    detail: str
    state: str
    recorded_at: datetime | None = None
    deleted_at: datetime | None = None


@dataclass(frozen=True)
class ServerCost:
    """SUs of one server: the share of the planned worst case, and what its state log says it spent.
    ``None`` where a figure cannot be known (flavour or state log missing: see the report's notes)."""

    id: str
    name: str
    flavor: str
    su_estimated: float | None
    su_spent: float | None
    hours_active: float | None


@dataclass
class RunReport:
    run_id: str
    pipeline: str
    cloud: str
    resources: list[ReportedResource]
    servers: list[ServerCost]
    worst_case_su: float | None
    remaining: dict[str, list[str]]
    curve: BurnCurve
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    notes: list[str] = field(default_factory=list)

    @property
    def su_spent(self) -> float:
        return sum(s.su_spent for s in self.servers if s.su_spent is not None)

    @property
    def clean(self) -> bool:
        """Nothing tagged with the run was left on the cloud when the report was gathered."""
        return not any(self.remaining.values())

    def metered(self) -> list[MeteredServer]:
        return [MeteredServer(s.name, s.flavor, s.su_spent, s.hours_active or 0.0)
                for s in self.servers if s.su_spent is not None]

    def burn_chart_png(self, budget_su: float | None = None) -> bytes:
        title = f"SUs of run {self.run_id[:12]} ({self.pipeline}) on {self.cloud}"
        return render_burn_chart(self.curve, worst_case_su=self.worst_case_su, budget_su=budget_su, title=title)

    def summary(self) -> list[str]:
        """A few lines for a terminal or a log."""
        worst = f" of {self.worst_case_su:.2f} worst case planned" if self.worst_case_su is not None else ""
        left = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.remaining.items() if v)
        return [
            f"run {self.run_id} ({self.pipeline}) on {self.cloud}: {len(self.resources)} resources, "
            f"{len(self.servers)} server(s)",
            f"SU spent {self.su_spent:.4f}{worst}",
            "teardown: clean, nothing tagged with the run remains" if self.clean else f"teardown: REMAINING {left}",
            *(f"note: {n}" for n in self.notes),
        ]


def reports_dir(run_id: str) -> Path:
    """Where a run's report files are kept on this machine: ``$SLIPSTREAM_HOME/reports/<run_id>``."""
    return slipstream_home() / "reports" / run_id


def resolve_run_id(ledger: Ledger, text: str) -> str:
    """The full run id ``text`` names: itself, or the one ledger run id it is a unique prefix of."""
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("no run id given", hint=_FIND_RUNS)
    known = list(dict.fromkeys(e.run_id for e in reversed(ledger.entries())))  # newest first
    if text in known:
        return text
    matches = [r for r in known if r.startswith(text)]
    if len(matches) > 1:
        raise InvalidRequest(f"run id {text!r} is ambiguous: it starts {len(matches)} runs in the ledger",
                             hint=f"Give more characters: {', '.join(matches[:5])}.")
    return matches[0] if matches else text


def gather_run_report(
    cloud: CloudProvider, run_id: str, *, ledger: Ledger | None = None, until: datetime | None = None,
) -> RunReport:
    """Everything the report shows for ``run_id`` on ``cloud``; read-only (nothing is changed).

    Raises :class:`NotFound` when neither the ledger nor the cloud knows the run (a run that
    recorded its worst case is known, even if it created nothing), and
    :class:`InvalidRequest` when the ledger has it on another cloud.
    """
    ledger = ledger or Ledger()
    run_id = resolve_run_id(ledger, run_id)
    # Validates the id before it is used in a cloud query; the Lease is never entered.
    owner = Ownership(run_id=run_id, pipeline="report", creator="slipstream", expires_at=datetime.now(UTC))
    entries = ledger.entries(run_id)
    here = [e for e in entries if e.cloud == cloud.name and e.state != "failed"]
    live = {s.id: s for s in cloud.list_servers(run_id=run_id)}
    on_cloud = Lease(cloud, owner, ledger=ledger).owned_now()
    # A cloud that keeps the history of deleted servers (LocalCloud) fills gaps in the ledger,
    # e.g. for a run killed before it could record its servers' flavours.
    history_of = getattr(cloud, "server_history", None)
    history = {h.id: h for h in history_of(run_id)} if callable(history_of) else {}
    worst_case = ledger.worst_case(run_id)
    if not here and not any(on_cloud.values()) and not history and worst_case is None:
        raise _unknown_run(ledger, cloud.name, run_id, entries)

    notes: list[str] = []
    if worst_case is None:
        notes.append("the run's worst case was not recorded in the ledger (it is recorded when the run reports)")
    # Every server of the run, id -> name in the order the run created them, and its flavour.
    server_ids = {e.resource_id: e.name for e in here if e.kind == ResourceKind.SERVER and e.resource_id}
    for sid, known in [*history.items(), *live.items()]:
        server_ids.setdefault(sid, known.name)
    recorded = ledger.server_flavors(cloud.name)
    flavor_of = {sid: (live[sid].flavor if sid in live else recorded.get(sid)
                       or (history[sid].flavor if sid in history else "")) for sid in server_ids}
    catalogue: dict[str, Flavor] = {**FLAVORS, **{f.name: f for f in cloud.list_flavors()}}
    logs = _state_logs(cloud, server_ids, flavor_of, catalogue, notes)
    metered = {sid: meter_log(server_ids[sid], catalogue[flavor_of[sid]], log, until) for sid, log in logs.items()}
    shares = _worst_case_shares(worst_case, {sid: catalogue.get(flavor_of[sid]) for sid in server_ids})
    servers = [ServerCost(sid, name, flavor_of[sid], shares.get(sid),
                          metered[sid].su if sid in metered else None,
                          metered[sid].hours_active if sid in metered else None)
               for sid, name in server_ids.items()]

    resources = [ReportedResource(e.kind, e.name, e.resource_id or "", flavor_of.get(e.resource_id or "", ""),
                                  e.state, e.recorded_at, e.deleted_at) for e in here]
    in_ledger = {(e.kind, e.resource_id) for e in here}
    resources += [ReportedResource(str(kind), name, rid, flavor_of.get(rid, ""), "on cloud, not in ledger")
                  for kind, pairs in on_cloud.items() for rid, name in pairs if (str(kind), rid) not in in_ledger]
    pipeline = next((e.pipeline for e in entries), None) or next(
        (s.ownership.pipeline for s in live.values() if s.ownership), "?")
    usage = [ServerUsage(server_ids[sid], catalogue[flavor_of[sid]], log) for sid, log in logs.items()]
    return RunReport(
        run_id=run_id, pipeline=pipeline, cloud=cloud.name, resources=resources, servers=servers,
        worst_case_su=worst_case, remaining={str(k): [name for _, name in v] for k, v in on_cloud.items()},
        curve=burn_curve(usage, until), notes=notes,
    )


def _unknown_run(ledger: Ledger, cloud: str, run_id: str, entries: list) -> CloudError:
    elsewhere = sorted({e.cloud for e in entries} - {cloud})
    if elsewhere:
        return InvalidRequest(f"run {run_id} is recorded on {', '.join(elsewhere)}, not on {cloud}",
                              hint=f"Ask that cloud: `slipstream report {run_id} --cloud <cloud>`.")
    recent = list(dict.fromkeys(e.run_id for e in reversed(ledger.entries())))[:5]
    return NotFound(f"no run {run_id!r} in the ledger ({ledger.path}) and nothing tagged with it", cloud=cloud,
                    hint=_FIND_RUNS + (f" Recent runs in the ledger: {', '.join(recent)}." if recent else ""))


def _state_logs(cloud: CloudProvider, server_ids: dict[str, str], flavor_of: dict[str, str],
                catalogue: dict[str, Flavor], notes: list[str]) -> dict[str, list[tuple[ServerStatus, datetime]]]:
    """The state log of every server that can be metered; a note for each that cannot."""
    logs = {}
    for sid, name in server_ids.items():
        if flavor_of[sid] not in catalogue:
            notes.append(f"server {name} ({sid}): flavour unknown, its SUs are not metered")
            continue
        try:
            logs[sid] = cloud.state_log(sid)
        except NotFound:
            notes.append(f"server {name} ({sid}): {cloud.name} has no state log for it any more, SUs not metered")
    return logs


def _worst_case_shares(worst_case: float | None, flavors: dict[str, Flavor | None]) -> dict[str, float]:
    """The run's worst case split over its servers by their SU rates: exact when the servers share
    one walltime, as in every slipstream flow's plan (worst case = Σ rate × max hours)."""
    rates = {sid: su_per_hour(f) for sid, f in flavors.items() if f is not None}
    total = sum(rates.values())
    if worst_case is None or total <= 0:
        return {}
    return {sid: worst_case * rate / total for sid, rate in rates.items()}


def write_report_files(report: RunReport, out_dir: Path, *, png: bytes | None = None) -> list[Path]:
    """Write resources.csv, cost.csv, teardown.md and burn.png into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in REPORT_FILES]
    with paths[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "name", "id", "detail", "state", "recorded_at", "deleted_at"])
        for r in report.resources:
            w.writerow([r.kind, r.name, r.id, r.detail, r.state, _iso(r.recorded_at), _iso(r.deleted_at)])
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["server", "server_id", "flavor", "su_estimated", "su_spent", "hours_active"])
        for s in report.servers:
            w.writerow([s.name, s.id, s.flavor, _num(s.su_estimated), _num(s.su_spent), _num(s.hours_active)])
        w.writerow(["TOTAL", "", "", _num(report.worst_case_su), _num(report.su_spent), ""])
    paths[2].write_text(teardown_markdown(report))
    paths[3].write_bytes(png if png is not None else report.burn_chart_png())
    return paths


def teardown_markdown(report: RunReport) -> str:
    """What is left of the run on the cloud now, as Markdown."""
    verdict = ("**Clean**: nothing tagged with this run remains, so nothing keeps charging the allocation."
               if report.clean else
               "**Not clean**: these resources of the run still exist. `slipstream reap --yes` deletes them.")
    rows = "\n".join(f"| {kind} | {', '.join(names) or '—'} |" for kind, names in report.remaining.items())
    deleted = sum(1 for r in report.resources if r.state == "deleted")
    notes = "".join(f"- {n}\n" for n in report.notes)
    return (
        f"# Teardown of run {report.run_id}\n\n"
        f"Pipeline `{report.pipeline}`, cloud `{report.cloud}`; everything tagged with the run id, listed "
        f"{report.checked_at:%Y-%m-%d %H:%M:%S} UTC.\n\n{verdict}\n\n"
        f"| kind | remaining |\n|---|---|\n{rows}\n\n"
        f"The ledger records {len(report.resources)} resources for the run, {deleted} of them deleted.\n"
        + (f"\n## Notes\n\n{notes}" if notes else "")
    )


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds") if when else ""


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.8f}"
