"""Follow the chart's models-pull Jobs: list them (and their pods) in the namespaces where a run waits on them.

kopf's watches of Jobs and pods are label-selected on the server to the operator's own children, and a label selector
cannot say "these or the chart's pull", so the pull Jobs (`app.kubernetes.io/component=models-pull`) come by a
listing of their own: one task lists them, label-selected, in each namespace that has a run which would read the model
cache and is not finished (`Wakers.waiting_models`, kept by `observe`), at once when such a namespace first shows up
and every POLL_S seconds after; a change wakes the runs of that namespace. Nothing is listed where nothing waits.

A pod the Job controller deleted while its Job stays (it deletes the pod of a failed Job that restarts in place) is
kept as last listed: its termination message is the pull's summary, which the Job's condition does not carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from .kube import Kube
from .models_gate import COMPONENT_LABEL, MODELS_PULL, pods_of
from .wakers import Wakers

logger = logging.getLogger(__name__)

POLL_S = 5.0  # how often the pull Jobs of a namespace where a run waits are listed again
SELECTOR = f"{COMPONENT_LABEL}={MODELS_PULL}"


async def start(memo: Any, **_: Any) -> None:
    """kopf's startup: the listing task, for the operator's lifetime. Nothing is listed yet, so a cluster without
    a pull Job (or an API that refuses the listing) never stops the operator from starting."""
    memo.pulls_task = asyncio.create_task(follow(memo.kube, memo.wakers), name="kleinstyle models-pull listing")


async def stop(memo: Any, **_: Any) -> None:
    task: asyncio.Task[None] | None = getattr(memo, "pulls_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def follow(kube: Kube, wakers: Wakers, interval: float = POLL_S) -> None:
    """List the pull Jobs of every namespace that has a waiting run, now and every `interval` seconds, or at once
    when a namespace is wanted that was never listed."""
    while True:
        wakers.pulls_wanted.clear()
        for namespace in list(wakers.waiting_models):
            if not wakers.waiting_models[namespace]:
                # Nothing waits there any more: forget it, and list it afresh when something does.
                del wakers.waiting_models[namespace]
                wakers.pulls.pop(namespace, None)
                continue
            try:
                await refresh(kube, wakers, namespace)
            except Exception:  # a bug must not end the listing for every namespace
                logger.exception(f"listing the models-pull Jobs of namespace {namespace} failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakers.pulls_wanted.wait(), timeout=interval)


async def refresh(kube: Kube, wakers: Wakers, namespace: str) -> None:
    """List `namespace`'s pull Jobs and their pods; when that changes what was known, keep it and wake the runs that
    wait there. Refused (403: the operator's Role lacks it), the namespace counts as having none, so runs are not
    held for ever; a transient failure is tried again at the next round."""
    try:
        jobs = await kube.list("Job", namespace, SELECTOR)
        pods = await kube.list("Pod", namespace, SELECTOR)
    except ApiException as exc:
        logger.warning(f"cannot list the models-pull Jobs of namespace {namespace} ({exc.status} {exc.reason})")
        if exc.status != 403:
            return
        jobs, pods = [], []
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning(f"cannot list the models-pull Jobs of namespace {namespace}: {type(exc).__name__}")
        return
    before = wakers.pulls.get(namespace)
    if before is not None:
        listed = {pod["metadata"].get("uid") for pod in pods}
        pods += [
            pod
            for pod in before[1]
            if pod["metadata"].get("uid") not in listed and any(pods_of(job, [pod]) for job in jobs)
        ]
    if before is None or _versions(before) != _versions((jobs, pods)):
        wakers.pulls[namespace] = (jobs, pods)
        wakers.wake_namespace(namespace)


def _versions(listed: tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]) -> set[tuple[str, str, str]]:
    return {
        (obj.get("kind") or "", obj["metadata"].get("uid") or "", obj["metadata"].get("resourceVersion") or "")
        for objs in listed
        for obj in objs
    }
