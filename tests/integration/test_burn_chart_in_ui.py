"""The burn chart shows in the real Prefect UI, in a real browser.

`tasks/report.py` publishes the burn chart as a Markdown artifact whose image is a
``data:image/png;base64,…`` URI, on the claim that Prefect 3.9's UIs let ``data:image/`` sources
through their Markdown sanitiser. This checks it the way a user would see it: a `prefect server
start` with its UI on 127.0.0.1, the real demo flow on the embedded local cloud publishing to it,
and headless Debian Chromium (`make test` installs the ``chromium`` package) opening the run's
Artifacts tab, following its link to the burn chart, and rendering that page — in the default
(V2, React) UI and in the V1 (Vue) UI a user can switch to. The DOM must hold the whole chart as
an ``<img>`` with the text around it, and a screenshot must show the chart's SU band painted.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TypeVar
from uuid import UUID, uuid4

import pytest
from PIL import Image

from tests.support import wait_until

SERVER_START_TIMEOUT = 180.0
PAGE_TIMEOUT = 90.0  # for one page to show what is asked of it, reloading as needed
CHROMIUM_RUN_TIMEOUT = 60.0  # for one `chromium --dump-dom` or `--screenshot`

T = TypeVar("T")


# --- the Prefect server, with its UI --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read() if response.status == 200 else None
    except OSError:
        return None


def _end_process_group(proc: subprocess.Popen, grace: float) -> None:
    """End ``proc`` and every process of its group (it leads one of its own): SIGTERM, then
    SIGKILL after ``grace`` s. Idempotent; fails if any of the group outlives SIGKILL."""

    def ended() -> bool:
        if proc.poll() is None:
            return False
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            wait_until(ended, timeout=wait, what=f"the end of process group {proc.pid} ({proc.args[0]})")
            return
        except AssertionError:
            if sig == signal.SIGKILL:
                raise


@pytest.fixture
def prefect_ui(tmp_path) -> Iterator[str]:
    """`prefect server start` with its UI on a free port of 127.0.0.1, in a process group of its
    own and a PREFECT_HOME in ``tmp_path``; yields its base URL, and this process's flows and
    client talk to it. Prefect's test harness cannot serve here: it runs with the UI turned off."""
    import prefect.settings
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"{base}/api")
    log = tmp_path / "prefect-server.log"
    cli = Path(sys.executable).parent / "prefect"
    with log.open("wb") as out:
        server = subprocess.Popen([str(cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def healthy() -> bool:
            if server.poll() is not None:
                pytest.fail(f"prefect server start exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            return _get(f"{base}/api/health") is not None

        wait_until(healthy, timeout=SERVER_START_TIMEOUT, what=f"Prefect server at {base}")
        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: f"{base}/api"}):
            yield base
            # Logs and events still queued go to this server, not to a stopped one.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        _end_process_group(server, grace=20.0)


# --- headless Chromium ---------------------------------------------------------------------


@dataclass
class Page:
    """What a page's DOM shows: its images, links and visible text."""

    dom: str
    images: list[dict[str, str]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    text: str = ""

    @classmethod
    def parse(cls, dom: str) -> Page:
        page = cls(dom)
        parser = _PageParser(page)
        parser.feed(dom)
        page.text = " ".join(parser.words)
        return page

    def describe(self) -> str:
        shown = [f"<img alt={i.get('alt')!r} src={i.get('src', '')[:40]!r}…>" for i in self.images]
        return f"images: {shown or 'none'}; text: {self.text[:1500]!r}"


class _PageParser(HTMLParser):
    def __init__(self, page: Page) -> None:
        super().__init__(convert_charrefs=True)
        self.page, self.skipping, self.words = page, 0, []

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.page.images.append(attributes)
        elif tag == "a" and "href" in attributes:
            self.page.links.append(attributes["href"])
        elif tag in ("script", "style"):
            self.skipping += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skipping = max(0, self.skipping - 1)

    def handle_data(self, data):
        if not self.skipping:
            self.words.extend(data.split())


@dataclass
class HeadlessChromium:
    """Debian's ``chromium``, headless: one fresh process (and profile) per page rendered."""

    binary: str
    profiles: Path

    def _render(self, url: str, *output: str) -> bytes:
        self.profiles.mkdir(exist_ok=True)
        profile = tempfile.mkdtemp(prefix="profile-", dir=self.profiles)
        command = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=15000", *output, url,
        ]
        browser = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = browser.communicate(timeout=CHROMIUM_RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"chromium did not finish rendering {url} within {CHROMIUM_RUN_TIMEOUT} s")
        finally:
            _end_process_group(browser, grace=5.0)
        if browser.returncode != 0:
            pytest.fail(f"chromium exited with {browser.returncode} on {url}:\n{err.decode()[-2000:]}")
        return out

    def dom(self, url: str) -> Page:
        return Page.parse(self._render(url, "--dump-dom").decode())

    def screenshot(self, url: str) -> Image.Image:
        shot = self.profiles / f"{uuid4().hex}.png"
        self._render(url, "--window-size=1280,1300", f"--screenshot={shot}")
        return Image.open(shot).convert("RGB")

    def open(self, url: str, shows: Callable[[Page], bool], what: str) -> Page:
        """The DOM of ``url`` once it ``shows`` ``what``."""
        return _until(lambda: self.dom(url), shows, f"{what} at {url}", Page.describe)


def _until(render: Callable[[], T], shows: Callable[[T], bool], what: str, describe: Callable[[T], str]) -> T:
    """Render until ``shows`` holds (a slow API call can leave one render short), failing after
    PAGE_TIMEOUT with what the last render showed."""
    last: list[T] = []

    def rendered() -> T | None:
        last[:] = [render()]
        return last[0] if shows(last[0]) else None

    try:
        return wait_until(rendered, timeout=PAGE_TIMEOUT, what=what)
    except AssertionError:
        pytest.fail(f"never showed {what} within {PAGE_TIMEOUT} s; the last render: {describe(last[0])}")


@pytest.fixture
def chromium(tmp_path) -> HeadlessChromium:
    binary = shutil.which("chromium")
    if not binary:
        pytest.fail("Chromium is not installed: this test renders the Prefect UI in headless Debian Chromium. "
                    "`make test` installs it (Debian package `chromium`; by hand: apt-get install chromium).")
    return HeadlessChromium(binary, tmp_path / "chromium")


# --- the test --------------------------------------------------------------------------------


def _burn_chart_artifact(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["demo-burn-chart"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    assert len(found) == 1, f"expected one demo-burn-chart artifact for flow run {flow_run_id}, got {found}"
    return found[0]


def _shows_a_png_image(page: Page) -> bool:
    return any(i.get("src", "").startswith("data:image/png;base64,") for i in page.images)


def _band_colour(png: bytes) -> tuple[tuple[int, int, int], int]:
    """The chart's most used saturated colour (the fill of its SU band) and how many pixels have it."""
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(1 << 20)
    count, colour = max((n, c) for n, c in colours if max(c) - min(c) > 40)
    return colour, count


def _pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return next((n for n, c in image.getcolors(1 << 22) if c == colour), 0)


def test_the_demo_burn_chart_shows_on_its_artifact_page(chromium, prefect_ui, cloud_env, tmp_path):
    from slipstream.flows.demo import demo

    result = demo(results_dir=str(tmp_path / "results"))
    assert result.teardown_clean and result.exit_status == 0

    # The artifacts belong to the vm_job subflow run that did the work (result.run_id): the
    # demo's own run shows none, and a user reaches them through its Subflow Runs tab.
    chart = _burn_chart_artifact(result.run_id)
    inline = re.search(r"\((data:image/png;base64,([A-Za-z0-9+/=]+))\)", chart.data)
    assert inline, f"no inline PNG in the burn-chart artifact: {chart.data[:300]!r}"
    published, png = inline.group(1), base64.b64decode(inline.group(2))
    assert Image.open(io.BytesIO(png)).size == (960, 540)
    ui_settings = _get(f"{prefect_ui}/ui-settings")
    assert ui_settings and f'"api_url":"{prefect_ui}/api"'.encode() in ui_settings, ui_settings

    # The run's Artifacts tab (default UI, V2) lists the burn chart and links to its page.
    chart_path = f"/v2/artifacts/artifact/{chart.id}"
    run_page = chromium.open(f"{prefect_ui}/v2/runs/flow-run/{result.run_id}?tab=Artifacts",
                             lambda page: chart_path in page.links, "a link to the burn-chart artifact")
    assert "demo-burn-chart" in run_page.text and "MARKDOWN" in run_page.text

    # What a user sees on the chart's page, in the default UI (V2) and in V1: the whole chart as an
    # <img> with the text around it in the DOM, and the chart's SU band painted on the screen.
    spent = f"Spent {result.su_spent:.4f} SU of a worst case of {result.su_estimated:.2f} SU planned"
    band, band_pixels = _band_colour(png)
    for ui, path in (("V2", chart_path), ("V1", f"/artifacts/artifact/{chart.id}")):
        url = f"{prefect_ui}{path}"
        page = chromium.open(url, _shows_a_png_image, f"the burn chart as an <img> ({ui} UI)")
        (img,) = [i for i in page.images if i.get("src", "").startswith("data:image/")]
        assert img["src"] == published, f"{ui} UI: the <img> is not the whole published chart"
        assert img.get("alt") == f"Cumulative SUs of run {result.run_id} over time", img.get("alt")
        assert f"SUs spent by run {result.run_id}" in page.text, f"{ui} UI: {page.describe()}"
        assert spent in page.text, f"{ui} UI: {page.describe()}"
        _until(lambda url=url: chromium.screenshot(url), lambda shot: _pixels_of(shot, band) >= 0.15 * band_pixels,
               f"the chart's SU band {band} painted ({ui} UI) at {url}",
               lambda shot: f"{_pixels_of(shot, band)} pixels of that colour (the chart has {band_pixels})")
