"""Progress of long waits (booting, SSH coming up), for whoever is watching.

The core and the tasks call :func:`report`; a front end (the CLI's progress bar) subscribes with
:func:`reporting_to`. With nobody subscribed, reports cost nothing. Kept free of any UI library so
the core stays usable from a Slurm ResumeProgram.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str, int, int, str], None]
"""Called with (stage, done, total, detail), e.g. ("booting", 1, 2, "1 ACTIVE, 1 BUILD")."""

_lock = threading.Lock()
_reporters: list[Reporter] = []


def report(stage: str, done: int, total: int, detail: str = "") -> None:
    with _lock:
        listeners = list(_reporters)
    for reporter in listeners:
        reporter(stage, done, total, detail)


@contextmanager
def reporting_to(reporter: Reporter) -> Iterator[None]:
    with _lock:
        _reporters.append(reporter)
    try:
        yield
    finally:
        with _lock:
            _reporters.remove(reporter)
