"""A resource's daemon: observe, decide, write, then sleep until something it depends on changes.

Watch, don't poll: an event on the resource itself, on one of its children (a Job that starts, completes or fails)
or on an object it waits for (its board, its LoRAs) wakes it at once (`handlers`); a slow resync (`resyncSeconds`)
is the safety net. A reconcile that fails says so where its user looks, a `ReconcileError` condition and a Warning
Event, and is retried sooner than the resync but less often while the same error repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from . import events, metrics, usage
from .config import OperatorConfig
from .events import namespace_terminating
from .kube import Kube
from .observe import observe
from .reconcile import failed_reconcile, reconcile, settled
from .wakers import Wakers
from .write import now_rfc3339, patch_status, write_decision

ERROR_TEXT_LIMIT = 500  # characters of an exception's text in status and Events (the log has it all)


async def run_resource(body: Any, memo: Any, logger: Any, stopped: Any, **indexes: Any) -> None:
    """A resource's daemon: reconcile, then sleep until an event wakes it (or the slow resync, or a retry)."""
    cfg: OperatorConfig = memo.config
    wakers: Wakers = memo.wakers
    uid = body["metadata"]["uid"]
    wake = wakers.event(uid)
    try:
        while not stopped:
            wake.clear()
            retry = await reconcile_once(body, memo, logger, indexes)
            timeout = retry if retry is not None else None if settled(wakers.current(body)) else cfg.resync_seconds
            await _sleep(wake, stopped, timeout)
    finally:
        wakers.forget(uid)


async def reconcile_once(body: Any, memo: Any, logger: Any, indexes: Mapping[str, Any]) -> float | None:
    """One reconcile of `body`; None when it succeeded, else the seconds until it should be tried again."""
    kind, meta = body["kind"], body["metadata"]
    cfg: OperatorConfig = memo.config
    kube: Kube = memo.kube
    started = time.perf_counter()
    outcome = "ok"
    body = memo.wakers.current(body)
    try:
        observed = observe(body, indexes, memo.wakers)
        decision = reconcile(observed, cfg, now_rfc3339())
        before = dict(body.get("status") or {})
        decision = await write_decision(kube, body, decision, memo.wakers, logger)
        jobs = usage.jobs_by_name(observed.children, decision.create)
        after = {**before, **decision.status}
        now = datetime.now(UTC)
        change = usage.Change.of(kind, meta["namespace"], meta["name"], before, after, jobs, now, observed.pods)
        if (gpu := metrics.record(change)) is not None:
            since = change.before.start_time or change.after.start_time
            logger.info(f"counted {gpu[0]:.1f} GPU-seconds (node pool {gpu[1] or 'none'}) of the pod started {since}")
        memo.wakers.succeeded(meta["uid"])
        return None
    except ApiException as exc:
        if namespace_terminating(exc):
            # The namespace is being deleted: its children went first, and nothing may be created there again.
            # Not an error of the object's; its own deletion (cleanup) follows.
            logger.info(f"not reconciled: namespace {meta['namespace']} is being deleted")
            return None
        # Refused by the API (quota, a policy webhook, RBAC): the API's message says why; no traceback needed.
        outcome = "error"
        message = f"the Kubernetes API refused a request: {exc.status} {exc.reason}: {_api_message(exc)}"
        logger.error(message)
        return await report_failure(kube, body, memo.wakers, "ApiError", message)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        # The API server did not answer (restarting, its connection lost mid-request): no bug of anyone's here; the
        # next try goes through once it is back.
        outcome = "error"
        message = f"could not reach the Kubernetes API: {type(exc).__name__}: {str(exc)[:ERROR_TEXT_LIMIT]}"
        logger.warning(message)
        return await report_failure(kube, body, memo.wakers, "ApiUnreachable", message)
    except Exception as exc:
        # A bug, or a configuration the code did not expect: the traceback goes to the log, the gist to the user.
        outcome = "error"
        message = (
            f"reconcile failed: {type(exc).__name__}: {str(exc)[:ERROR_TEXT_LIMIT]} "
            "(operator bug or configuration error; see the operator log)"
        )
        logger.exception(message)
        return await report_failure(kube, body, memo.wakers, "ReconcileError", message)
    finally:
        metrics.RECONCILES.labels(kind, outcome).inc()
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


async def report_failure(kube: Kube, body: Any, wakers: Wakers, reason: str, message: str) -> float:
    """Say why a reconcile failed where its user looks: a `ReconcileError` condition with `reason` in status (the
    phase kept; patched only when that changes) and a Warning Event (one per WARNING_INTERVAL_S); the seconds until
    the next try."""
    uid = body["metadata"]["uid"]
    # The API may refuse this too, or not answer: the log still says it, and the next try reports again.
    with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError, OSError):
        await patch_status(kube, body, failed_reconcile(body, reason, message, now_rfc3339()).status, wakers)
    if wakers.may_warn(uid, reason, time.monotonic()):
        with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError, OSError):  # the log line says it
            await events.post(kube, body, "Warning", reason, message)
    return wakers.failed(uid, f"{reason}: {message}")


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or "")
    except ValueError:
        return str(exc.body or "")[:300]


async def _sleep(wake: asyncio.Event, stopped: Any, timeout: float | None) -> None:
    woken = asyncio.ensure_future(wake.wait())
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({woken, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        stopping.cancel()
