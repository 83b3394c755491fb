"""The one retry policy: exponential backoff with jitter, for transient cloud failures only.

A cloud that says how long to wait (HTTP ``Retry-After`` on a 429/503, carried as
:attr:`TransientError.retry_after`) is obeyed: the pause is never shorter than it asked
(:func:`pause_for`, which waits in ``slipstream.cloud.waiting`` use too) — but a retry inside a
wait's poll never pauses past that wait's deadline (:func:`within`): the wait decides.

Quota, capacity and bad-request errors are never retried here: repeating them spends time and,
on a real cloud, API rate limit, without any chance of success.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from slipstream.cloud.errors import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delays(self) -> list[float]:
        """The pauses between attempts (len == attempts - 1), each with up to 25 % jitter."""
        out = []
        for i in range(self.attempts - 1):
            d = min(self.max_delay, self.base_delay * (2**i))
            out.append(d * (0.75 + random.random() / 4))
        return out


DEFAULT_RETRY = RetryPolicy()

#: The longest pause a ``Retry-After`` header can impose (a broken balancer may say an hour).
MAX_RETRY_AFTER = 60.0


def pause_for(err: BaseException, planned: float) -> float:
    """The pause before trying again after ``err``: ``planned``, or longer when the cloud asked."""
    asked = getattr(err, "retry_after", None) or 0.0
    return max(planned, min(float(asked), MAX_RETRY_AFTER))


#: The deadline (``time.monotonic()``) of the wait this thread is in, if any: a retry inside a
#: wait's poll gives up rather than pause past it (the wait decides what happens next).
_wait_deadline: ContextVar[float | None] = ContextVar("slipstream_wait_deadline", default=None)


@contextmanager
def within(deadline: float) -> Iterator[None]:
    """Retries made in this block never pause past ``deadline`` (a ``time.monotonic()`` value)."""
    token = _wait_deadline.set(deadline)
    try:
        yield
    finally:
        _wait_deadline.reset(token)


def retry(
    fn: Callable[[], T],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    retry_on: tuple[type[BaseException], ...] = (TransientError,),
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying only ``retry_on`` errors, at most ``policy.attempts``
    times. ``on_retry(attempt, error, delay)`` is told about each retry (for logs)."""
    delays = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except retry_on as err:
            if attempt == policy.attempts:
                raise
            delay = pause_for(err, delays[attempt - 1])
            limit = _wait_deadline.get()
            if limit is not None and time.monotonic() + delay > limit:
                raise  # the enclosing wait's deadline comes first
            if on_retry:
                on_retry(attempt, err, delay)
            sleep(delay)
    raise AssertionError("unreachable")
