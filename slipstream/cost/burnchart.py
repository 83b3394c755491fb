"""The burn chart: how a run's Service Units added up over time, as a PNG.

Each server's state log (BUILD, ACTIVE, SHUTOFF, SHELVED, ... with timestamps) becomes a
cumulative SU curve. The numbers come from :func:`slipstream.cost.accounting.meter` — the value at
time ``t`` is the meter run over the log up to ``t`` — so the chart ends exactly where the cost
table does. Between two status changes the charge rate is constant, so the curve is straight
between them and the points at the changes are exact::

    curve = burn_curve([ServerUsage("train", FLAVORS["g3.large"], cloud.state_log(server_id))])
    png = render_burn_chart(curve, worst_case_su=128.0, title="run 1234: SUs")

The chart stacks one band per server (one total line beyond 8 servers) and draws the planned
worst case (and a run budget, if given) as horizontal lines. When those are far above what was
spent — a 4-second test run against a 1-hour plan — they are drawn in a separate strip above a
broken axis, so the spent curve stays readable.

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no global figure state, safe
in threads and in processes without a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from slipstream.cost.accounting import StateLog, meter
from slipstream.cloud.models import Flavor, ServerStatus

#: Beyond this many servers the legend stops being readable: draw only the total.
MAX_STACKED_SERVERS = 8
#: A reference line more than this many times what was spent goes into the strip above the break.
OFF_SCALE_FACTOR = 4.0


@dataclass(frozen=True)
class ServerUsage:
    """One server's flavour and status changes: what the chart needs to meter it."""

    name: str
    flavor: Flavor
    state_log: StateLog


@dataclass(frozen=True)
class BurnCurve:
    """Cumulative SUs per server at each moment a status changed (``times`` ascending)."""

    times: list[datetime]
    per_server: dict[str, list[float]]
    flavors: dict[str, str] = field(default_factory=dict)  # server label -> flavour name, for the legend

    @property
    def total(self) -> list[float]:
        if not self.per_server:
            return [0.0 for _ in self.times]
        return [sum(values) for values in zip(*self.per_server.values(), strict=True)]

    @property
    def spent(self) -> float:
        total = self.total
        return total[-1] if total else 0.0


def burn_curve(servers: Sequence[ServerUsage], until: datetime | None = None) -> BurnCurve:
    """Cumulative SUs of ``servers`` from the first status change to the last deletion
    (or to ``until``, default now, while any server still exists)."""
    logged = [s for s in servers if s.state_log]
    if not logged:
        return BurnCurve([], {})
    start = min(s.state_log[0][1] for s in logged)
    if all(s.state_log[-1][0] == ServerStatus.DELETED for s in logged):
        end = max(s.state_log[-1][1] for s in logged)
    else:
        end = until or datetime.now(UTC)
    times = sorted({start, end} | {t for s in logged for _, t in s.state_log if t <= end})
    per_server: dict[str, list[float]] = {}
    flavors: dict[str, str] = {}
    for server in logged:
        label = server.name if server.name not in per_server else f"{server.name} ({len(per_server)})"
        per_server[label] = [meter(server.flavor, [e for e in server.state_log if e[1] <= t], until=t) for t in times]
        flavors[label] = server.flavor.name
    return BurnCurve(times, per_server, flavors)


def _time_axis(curve: BurnCurve) -> tuple[list[float], str]:
    """Elapsed time since the first status change, in the unit that keeps the numbers small."""
    seconds = [(t - curve.times[0]).total_seconds() for t in curve.times]
    span = seconds[-1] if seconds else 0.0
    for limit, divisor, unit in ((180, 1, "s"), (3 * 3600, 60, "min"), (float("inf"), 3600, "h")):
        if span <= limit:
            return [s / divisor for s in seconds], unit
    raise AssertionError("unreachable")


def render_burn_chart(
    curve: BurnCurve,
    *,
    worst_case_su: float | None = None,
    budget_su: float | None = None,
    title: str = "SUs spent",
    width_px: int = 960,
    height_px: int = 540,
    dpi: int = 100,
) -> bytes:
    """The burn chart of ``curve`` as PNG bytes of exactly ``width_px`` × ``height_px``."""
    # Imported here: matplotlib takes a noticeable fraction of a second to import, and most
    # users of the core (the CLI's other commands, Slurm programs) never draw anything.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spent = curve.spent
    references = [(label, value, style) for label, value, style in (
        ("worst case planned", worst_case_su, {"color": "#c0392b", "linestyle": "--"}),
        ("run budget", budget_su, {"color": "#8e44ad", "linestyle": ":"}),
    ) if value is not None and value > 0]
    scale = max(spent, 1e-12)
    on_scale = [r for r in references if r[1] <= OFF_SCALE_FACTOR * scale]
    off_scale = [r for r in references if r[1] > OFF_SCALE_FACTOR * scale]

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if off_scale:
        strip, ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 5]})
        _draw_broken_axis(strip, ax, off_scale)
    else:
        strip, ax = None, fig.subplots()
    fig.suptitle(title, fontsize=12)

    if not curve.times:
        ax.text(0.5, 0.5, "no servers: nothing was charged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("time")
    else:
        x, unit = _time_axis(curve)
        if len(curve.per_server) <= MAX_STACKED_SERVERS:
            labels = [f"{name} ({curve.flavors[name]})" if name in curve.flavors else name for name in curve.per_server]
            ax.stackplot(x, *curve.per_server.values(), labels=labels, alpha=0.55)
        ax.plot(x, curve.total, color="black", linewidth=1.6, label="total")
        ax.annotate(f"{spent:.4g} SU spent", xy=(x[-1], spent), xytext=(-8, 8), textcoords="offset points",
                    ha="right", fontsize=10)
        ax.set_xlim(x[0], max(x[-1], 1e-9))
        ax.set_xlabel(f"time since the first server was requested ({unit})")
    for label, value, style in on_scale:
        ax.axhline(value, linewidth=1.4, label=f"{label}: {value:.4g} SU", **style)
    ax.set_ylim(0, max([spent, *(r[1] for r in on_scale)]) * 1.15 or 1.0)
    ax.set_ylabel("cumulative SU")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _draw_broken_axis(strip, ax, references) -> None:
    """Put the far-away reference lines in ``strip`` above ``ax``, with break marks between."""
    low, high = min(r[1] for r in references), max(r[1] for r in references)
    strip.set_ylim(low * 0.75, high * 1.5)
    for label, value, style in references:
        strip.axhline(value, linewidth=1.4, **style)
        # Labelled on the line itself: a legend would cover most of this thin strip.
        strip.annotate(f"{label}: {value:.4g} SU", xy=(0.01, value), xycoords=strip.get_yaxis_transform(),
                       xytext=(0, 3), textcoords="offset points", va="bottom", fontsize=9, color=style["color"])
    strip.spines["bottom"].set_visible(False)
    ax.spines["top"].set_visible(False)
    strip.tick_params(bottom=False, labelbottom=False)
    strip.set_yticks(sorted({r[1] for r in references}))
    marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none", "color": "k",
             "mec": "k", "mew": 1, "clip_on": False}
    strip.plot([0, 1], [0, 0], transform=strip.transAxes, **marks)
    ax.plot([0, 1], [1, 1], transform=ax.transAxes, **marks)
    strip.set_title("axis broken: the planned figures are far above what was spent", fontsize=9, loc="right")
