"""No silent failure: a reconcile that raises says so in status, in one Warning Event and in the operator's log,
and retries less and less often while the same error repeats."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for
from kleinstyle.operator import logs
from kleinstyle.operator.kinds import KIND_RUNS
from kleinstyle.operator.wakers import ERROR_BACKOFF_S, MAX_ERROR_BACKOFF_S, WARNING_INTERVAL_S, Wakers

from .test_operator_e2e import BOARD, NS

BACKOFF_S = 0.2  # the first retry's wait in the end-to-end test, instead of ERROR_BACKOFF_S


@contextlib.contextmanager
def operator_log() -> Iterator[io.StringIO]:
    """The log as `kleinstyle operator --log-format json` writes it, into a buffer; the logging setup restored after."""
    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in logs.QUIETER}
    stream = io.StringIO()
    handler = logs.setup("INFO", "json", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def ready(obj: dict) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def warnings(cluster) -> list[dict]:
    return [
        e
        for e in cluster.emulator.list("events", NS)
        if e["involvedObject"]["name"] == "bd9" and e["type"] == "Warning"
    ]


@pytest.mark.emulator
async def test_a_reconcile_that_raises_is_a_condition_one_warning_an_error_line_and_slower_retries(
    root: Path, monkeypatch: pytest.MonkeyPatch
):
    attempts: list[float] = []

    def broken(*args: object, **kwargs: object) -> None:  # an operator bug, where a kind builds its run
        attempts.append(time.monotonic())
        raise KeyError("gpu-a100")

    monkeypatch.setattr("kleinstyle.operator.wakers.ERROR_BACKOFF_S", BACKOFF_S)
    monkeypatch.setattr(KIND_RUNS["StyleBoard"], "build", broken)
    with operator_log() as log:
        async with cluster_for(root, NS) as cluster:
            await cluster.apply([BOARD])
            await cluster.wait_for(lambda: len(attempts) >= 6, timeout=60)
            board = await cluster.get("styleboards", NS, "bd9")
            events = await cluster.wait_for(lambda: warnings(cluster))  # posted in the background

            # Fixed (here: the bug is gone) and touched, it runs; status no longer shows the error.
            monkeypatch.undo()
            await cluster.apply([{**BOARD, "metadata": {**BOARD["metadata"], "labels": {"fixed": "yes"}}}])
            recovered = await cluster.wait_for(
                lambda: ready(cluster.emulator.get("styleboards", NS, "bd9"))["reason"] != "ReconcileError", timeout=30
            )

    assert board["status"]["phase"] == "Pending"
    condition = ready(board)
    assert (condition["status"], condition["reason"]) == ("False", "ReconcileError")
    assert condition["message"].startswith("reconcile failed: KeyError: 'gpu-a100' (operator bug")
    assert [(e["reason"], e["message"]) for e in events] == [("ReconcileError", condition["message"])]

    intervals = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # A retry waits twice as long as the one before (own writes may wake the first ones early): 0.2 s would
    # have been every interval before.
    assert intervals[-1] >= 8 * BACKOFF_S, intervals

    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR" and line.get("name") == "bd9"]
    assert len(errors) >= 6
    assert errors[0]["namespace"] == NS and errors[0]["kind"] == "StyleBoard"
    assert errors[0]["message"] == condition["message"]
    assert "Traceback" in errors[0]["exception"] and "KeyError: 'gpu-a100'" in errors[0]["exception"]
    assert recovered


def test_the_retry_waits_longer_while_the_same_error_repeats_and_starts_over_after_success():
    wakers = Wakers()
    waits = [wakers.failed("uid", "ReconcileError: KeyError") for _ in range(12)]
    assert waits[:3] == [ERROR_BACKOFF_S, 2 * ERROR_BACKOFF_S, 4 * ERROR_BACKOFF_S]
    assert waits[-1] == MAX_ERROR_BACKOFF_S and waits == sorted(waits)
    assert wakers.failed("uid", "ApiError: 403") == ERROR_BACKOFF_S  # another error starts over
    wakers.failed("uid", "ApiError: 403")
    wakers.succeeded("uid")
    assert wakers.failed("uid", "ApiError: 403") == ERROR_BACKOFF_S
    assert wakers.failed("other", "ApiError: 403") == ERROR_BACKOFF_S  # per object


def test_one_warning_per_object_and_reason_per_interval():
    wakers = Wakers()
    assert wakers.may_warn("uid", "ReconcileError", now=1000.0)
    assert not wakers.may_warn("uid", "ReconcileError", now=1000.0 + WARNING_INTERVAL_S - 1)
    assert wakers.may_warn("uid", "ApiError", now=1001.0)
    assert wakers.may_warn("other", "ReconcileError", now=1001.0)
    assert wakers.may_warn("uid", "ReconcileError", now=1000.0 + WARNING_INTERVAL_S)
    wakers.forget("uid")
    assert wakers.may_warn("uid", "ApiError", now=1002.0)  # a deleted object's record goes with it
