"""The burn chart: a known state log gives a known cumulative curve, and the PNG is a real image."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image

from slipstream.cost.accounting import meter
from slipstream.cost.burnchart import ServerUsage, burn_curve, render_burn_chart
from slipstream.cloud.models import ServerStatus as S
from slipstream.jetstream2 import FLAVORS

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# A g3.medium (16 SU/h): 1 min building (free), 1 h active, 4 h shelved (free), 30 min active,
# 1 h stopped (half price), then deleted: 16 + 8 + 8 = 32 SU in all.
TRAIN_LOG = [(S.BUILD, at(0)), (S.ACTIVE, at(1)), (S.SHELVED_OFFLOADED, at(61)), (S.ACTIVE, at(301)),
             (S.SHUTOFF, at(331)), (S.DELETED, at(391))]
# An m3.quad (4 SU/h) active for 2 h, starting 30 min into the run.
PREP_LOG = [(S.BUILD, at(30)), (S.ACTIVE, at(30)), (S.DELETED, at(150))]


def test_a_known_state_log_gives_the_known_curve():
    curve = burn_curve([ServerUsage("train", FLAVORS["g3.medium"], TRAIN_LOG)])
    assert curve.times == [at(m) for m in (0, 1, 61, 301, 331, 391)]
    assert curve.per_server["train"] == pytest.approx([0, 0, 16, 16, 24, 32])
    assert curve.spent == pytest.approx(meter(FLAVORS["g3.medium"], TRAIN_LOG)) == pytest.approx(32)


def test_servers_add_up_at_every_status_change_and_end_where_the_meter_does():
    curve = burn_curve([ServerUsage("train", FLAVORS["g3.medium"], TRAIN_LOG),
                        ServerUsage("prep", FLAVORS["m3.quad"], PREP_LOG)])
    assert curve.times == [at(m) for m in (0, 1, 30, 61, 150, 301, 331, 391)]
    # prep: 0 until 30 min, then 4 SU/h: 31 min -> 2.0667, 2 h -> 8.
    assert curve.per_server["prep"] == pytest.approx([0, 0, 0, 31 / 60 * 4, 8, 8, 8, 8])
    assert curve.total == pytest.approx([t + p for t, p in zip(curve.per_server["train"], curve.per_server["prep"])])
    assert curve.spent == pytest.approx(32 + 8)


def test_a_server_still_running_is_charged_until_the_given_moment():
    live = [(S.BUILD, at(0)), (S.ACTIVE, at(0)), (S.SHUTOFF, at(60))]
    curve = burn_curve([ServerUsage("live", FLAVORS["m3.tiny"], live)], until=at(180))
    assert curve.times[-1] == at(180)
    assert curve.spent == pytest.approx(1 + 0.5 * 2) == pytest.approx(meter(FLAVORS["m3.tiny"], live, until=at(180)))


def test_no_servers_gives_an_empty_curve():
    curve = burn_curve([ServerUsage("never-booted", FLAVORS["m3.tiny"], [])])
    assert curve.times == [] and curve.spent == 0


def _image(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(png)).verify()  # checks every chunk's CRC
    return Image.open(io.BytesIO(png)).convert("RGB")


@pytest.mark.parametrize(
    ("worst_case", "budget"),
    [(60.0, None),     # the worst case fits on the spent curve's scale
     (600.0, 300.0),   # far above: drawn in a strip above a broken axis
     (None, None)],
)
def test_the_chart_is_a_valid_png_of_the_requested_size(worst_case, budget):
    curve = burn_curve([ServerUsage("train", FLAVORS["g3.medium"], TRAIN_LOG),
                        ServerUsage("prep", FLAVORS["m3.quad"], PREP_LOG)])
    image = _image(render_burn_chart(curve, worst_case_su=worst_case, budget_su=budget, title="run t1"))
    assert image.size == (960, 540)
    assert len(set(image.getdata())) > 20  # something was drawn: curves, text, lines


def test_the_worst_case_line_is_drawn_in_its_colour():
    curve = burn_curve([ServerUsage("train", FLAVORS["g3.medium"], TRAIN_LOG)])
    with_line = _image(render_burn_chart(curve, worst_case_su=40.0))
    without = _image(render_burn_chart(curve))

    def reddish(image: Image.Image) -> int:  # pixels near the line's #c0392b (anti-aliasing blurs it)
        return sum(1 for r, g, b in image.getdata() if abs(r - 0xC0) + abs(g - 0x39) + abs(b - 0x2B) < 40)

    assert reddish(with_line) > 300 and reddish(without) == 0


def test_an_empty_run_still_gives_a_chart_of_any_size():
    image = _image(render_burn_chart(burn_curve([]), worst_case_su=4.0, width_px=640, height_px=360))
    assert image.size == (640, 360)


def test_drawing_does_not_use_pyplot_global_state():
    code = ("import sys; from slipstream.cost.burnchart import burn_curve, render_burn_chart; "
            "render_burn_chart(burn_curve([])); assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
