"""Failed resumes per node, so a node that never comes up stops costing SUs.

Slurm's own stop for a node that does not register within ``ResumeTimeout`` is to mark it DOWN;
with ``idle_on_node_suspend`` (which cloud nodes need to be reused at all) the next power-down
makes it idle and resumable again, and every new attempt boots a VM that is ACTIVE — and billed —
for a whole ``ResumeTimeout``. So the power programs keep their own count, in
``<cluster>/resume-failures.json`` (the programs run as separate processes, concurrently, hence
the lock):

- after failure *n*, the node may not boot again for ``backoff × 2^(n-1)`` seconds;
- after ``max_attempts`` failures it is given up: drained, with a reason that says so, until the
  cluster is deleted.

    record = ResumeAttempts(settings.dir / "resume-failures.json", max_attempts=3, backoff=60)
    record.failed("c-1", "slurmd did not register")   # -> NodeAttempts(count=1, ...)
    record.holding(["c-1", "c-2"])                     # {"c-1": "backing off until 14:03:10 UTC ..."}
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

#: How a given-up node's Reason starts (the flow looks for it).
GAVE_UP = "slipstream gave up"


@dataclass(frozen=True)
class NodeAttempts:
    count: int
    last_failure: float   # time.time()
    why: str


class ResumeAttempts:
    def __init__(self, path: Path, *, max_attempts: int, backoff: float) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.backoff = backoff

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
            except ValueError:
                data = {}  # a torn file: start counting again rather than refuse every resume
            if not isinstance(data, dict):  # an edited or foreign file: the same
                data = {}
            data = {node: entry for node, entry in data.items() if _well_formed(entry)}
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)

    def failed(self, node: str, why: str) -> NodeAttempts:
        with self._locked() as data:
            count = int(data.get(node, {}).get("count", 0)) + 1
            data[node] = asdict(NodeAttempts(count, time.time(), why))
            return NodeAttempts(**data[node])

    def given_up(self, attempts: NodeAttempts) -> bool:
        return attempts.count >= self.max_attempts

    def retry_at(self, attempts: NodeAttempts) -> float:
        return attempts.last_failure + self.backoff * 2 ** (attempts.count - 1)

    def reason(self, node: str, attempts: NodeAttempts, resume_timeout: int) -> str:
        """The node's Reason in Slurm after ``attempts``."""
        what = f"{attempts.count} failed resume(s) of {node} (last: {attempts.why}; ResumeTimeout={resume_timeout} s)"
        if self.given_up(attempts):
            return f"{GAVE_UP} after {what}; drained, no more VMs for it"
        until = datetime.fromtimestamp(self.retry_at(attempts), timezone.utc).strftime("%H:%M:%S UTC")
        return f"slipstream: {what}; backing off until {until} (attempt {attempts.count + 1} of {self.max_attempts})"

    def holding(self, nodes: Sequence[str], resume_timeout: int) -> dict[str, str]:
        """{node: reason} for the ``nodes`` that may not boot now (given up, or backing off)."""
        now = time.time()
        with self._locked() as data:
            found = {n: NodeAttempts(**data[n]) for n in nodes if n in data}
        return {n: self.reason(n, a, resume_timeout) for n, a in found.items()
                if self.given_up(a) or now < self.retry_at(a)}


def _well_formed(entry: object) -> bool:
    """An entry :class:`NodeAttempts` can be made of (others are dropped: counting starts again)."""
    try:
        NodeAttempts(**entry)  # type: ignore[arg-type]
        return isinstance(entry["count"], int) and isinstance(entry["last_failure"], (int, float))  # type: ignore[index]
    except TypeError:
        return False
