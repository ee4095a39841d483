"""Bounded retries for provider calls: exponential backoff with full jitter that honours the server's wait.

google-genai's own `HttpRetryOptions` retries with tenacity's exponential jitter and ignores `Retry-After`, so the
text pipeline runs the SDK with retries off and retries here, the same way for both providers. Every loop is bounded
three ways (attempts, one wait, the total time), so a 429 storm ends in a clear error instead of a hung Job.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request is tried. Tests shrink the waits; production keeps the defaults."""

    attempts: int = 5  # tries, the first included
    base_s: float = 2.0  # the first backoff's ceiling; it doubles per retry
    cap_s: float = 60.0  # no backoff is longer than this
    max_server_wait_s: float = 120.0  # a server asking for a longer wait is not waited for
    deadline_s: float = 600.0  # all tries and waits of one request together


class Transient(Exception):
    """A failure worth another try (429, 5xx, a timeout, a reset connection); `retry_after` is the server's wait."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class GaveUp(Exception):
    """Retries ran out; the message says what failed, how often, and why the loop stopped."""


def backoff_s(policy: RetryPolicy, retry: int, retry_after: float | None, rand: float) -> float:
    """Seconds to wait before retry number `retry` (1 = the first retry).

    Full jitter, `rand * min(cap, base * 2**(retry-1))` with `rand` in [0, 1), spreads clients that failed together;
    a server's Retry-After is a floor, never shortened by the jitter.
    """
    jittered = rand * min(policy.cap_s, policy.base_s * 2.0 ** (retry - 1))
    return max(retry_after or 0.0, jittered)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a response asks for: `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if (millis := lowered.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def parse_duration(text: object) -> float | None:
    """A protobuf Duration as JSON ("37s", "1.5s"), as Gemini's RetryInfo.retryDelay carries it."""
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", text)
    return float(match.group(1)) if match else None


def call_with_retries(
    send: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """`send()` until it returns; a `Transient` is retried within `policy`, anything else propagates at once."""
    started = clock()
    for attempt in range(1, policy.attempts + 1):
        try:
            return send()
        except Transient as exc:
            problem = exc
        if attempt == policy.attempts:
            raise GaveUp(f"{what}: {problem.reason} (gave up after {attempt} attempts)")
        if problem.retry_after is not None and problem.retry_after > policy.max_server_wait_s:
            raise GaveUp(
                f"{what}: {problem.reason}; the server asked to wait {problem.retry_after:.0f} s, longer than "
                f"{policy.max_server_wait_s:.0f} s (attempt {attempt})"
            )
        wait = backoff_s(policy, attempt, problem.retry_after, rand())
        if clock() - started + wait > policy.deadline_s:
            raise GaveUp(
                f"{what}: {problem.reason}; no time left for another try within {policy.deadline_s:.0f} s "
                f"(attempt {attempt})"
            )
        log.info("%s: %s; retry %d of %d in %.1f s", what, problem.reason, attempt, policy.attempts - 1, wait)
        sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises
