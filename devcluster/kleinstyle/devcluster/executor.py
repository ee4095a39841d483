"""The dev cluster's kubelet and Job controller: every Job becomes a Pod object and a local process.

It lists and watches Jobs over HTTP (like any controller, through the API, so the operator sees the same objects
and events it would on a cluster) and mirrors the real controllers' status: pod phase Pending -> Running ->
Succeeded/Failed with the container's exit code, reason and termination message; Job `startTime`, `active`,
`succeeded`, `failed`, `completionTime` and the `SuccessCriteriaMet`/`Complete` or `FailureTarget`/`Failed`
conditions (BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy). Suspended Jobs (Kueue) do not run.

Simplifications: one pod per Job at a time (`completions`/`parallelism` > 1 are not modelled), every retry is a
new pod (`restartPolicy: OnFailure` behaves like Never), no retry back-off delay unless configured, and a pod
left Running by a previous executor process is marked Failed with reason ExecutorRestarted and retried without
counting against `backoffLimit`, as a node loss under a DisruptionTarget policy would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import os
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .builtin import JOB_NAME_LABELS, JOB_UID_LABELS
from .client import KubeClient
from .errors import ApiError
from .pod_setup import (
    KUBE_API_ENV,
    PodSetupError,
    PreparedContainer,
    container_status,
    prepare_container,
    prepare_until_ready,
    run_process,
)
from .store import now_rfc3339

logger = logging.getLogger(__name__)

JOBS = "batch/v1/jobs"
PODS = "v1/pods"
INTERRUPTED = "ExecutorRestarted"


class _JobGone(Exception):
    """The Job was deleted while it ran; its run just ends."""


@dataclass(frozen=True)
class Outcome:
    container: str
    exit_code: int
    reason: str
    message: str


def _phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def is_finished(job: dict[str, Any]) -> bool:
    return any((_condition(job, kind) or {}).get("status") == "True" for kind in ("Complete", "Failed"))


def _new_condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    now = now_rfc3339()
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def policy_action(job: dict[str, Any], container: str, exit_code: int) -> tuple[str | None, int]:
    """The first `podFailurePolicy` rule matching this exit code: (action, rule index), or (None, -1)."""
    rules = (job["spec"].get("podFailurePolicy") or {}).get("rules") or []
    for index, rule in enumerate(rules):
        codes = rule.get("onExitCodes")
        if not codes or codes.get("containerName") not in (None, container):
            continue
        values = set(codes.get("values") or [])
        matched = exit_code in values if codes.get("operator", "In") == "In" else exit_code not in values
        if matched:
            return rule.get("action"), index
    return None, -1


class Executor:
    """Runs Jobs found in the API as local processes, `parallelism` pods at a time.

    Use as `async with Executor(client, root, api_url=...)`, or `start()` / `await stop()`. Stopping kills the
    running processes; a later executor picks the Jobs up again without re-running one that already succeeded.
    """

    def __init__(
        self,
        client: KubeClient,
        root: str | Path,
        *,
        api_url: str,
        parallelism: int = 2,
        resync_interval: float = 2.0,
        default_command: Sequence[str] | None = None,
        retry_delay: float = 0.0,
        kill_grace: float = 3.0,
    ) -> None:
        self.client = client
        self.root = Path(root).resolve()
        self.api_url = api_url
        self.resync_interval = resync_interval
        self.default_command = list(default_command) if default_command else None
        self.retry_delay = retry_delay
        self.kill_grace = kill_grace
        self._parallelism = parallelism
        self._slots: asyncio.Semaphore | None = None
        self._runs: dict[str, asyncio.Task[bool]] = {}
        self._finished: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Executor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._slots = asyncio.Semaphore(self._parallelism)
            self._task = asyncio.create_task(self._control_loop(), name="devcluster-executor")

    async def stop(self) -> None:
        """Stop watching and kill every running pod process."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        for uid in list(self._runs):
            await self._cancel(uid)

    async def _control_loop(self) -> None:
        """Sync, then sleep until a Job changes (a watch) or `resync_interval` passes, like an informer."""
        while True:
            try:
                version = await self.sync_once()
                await self.client.next_event(JOBS, version, timeout=self.resync_interval)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                logger.warning("executor: watching Jobs failed: %s", exc)
                await asyncio.sleep(self.resync_interval)

    async def sync_once(self) -> str:
        """One pass of the Job controller: start, suspend, stop and expire runs to match the Jobs in the API.

        Returns the resourceVersion of the Job list it acted on."""
        jobs, version = await self.client.list_with_version(JOBS)
        seen: set[str] = set()
        for job in jobs:
            uid = job["metadata"]["uid"]
            seen.add(uid)
            run = self._runs.get(uid)
            if run is not None and run.done():
                self._reap(uid, run)
                run = None
            if job["metadata"].get("deletionTimestamp"):
                if run is not None:
                    await self._cancel(uid)
            elif job["spec"].get("suspend"):
                if run is not None:
                    await self._cancel(uid)
                    await self._suspend(job)
                elif not is_finished(job) and (_condition(job, "Suspended") or {}).get("status") != "True":
                    await self._suspend(job)
            elif is_finished(job):
                await self._expire(job)
            elif run is None and uid not in self._finished:
                name = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
                self._runs[uid] = asyncio.create_task(self._run_job(job), name=f"devcluster job {name}")
        for uid in list(self._runs):
            if uid not in seen:
                await self._cancel(uid)  # the Job is gone: kill its process
        return version

    def _reap(self, uid: str, run: asyncio.Task[bool]) -> None:
        del self._runs[uid]
        if run.cancelled():
            return
        error = run.exception()
        if error is not None:
            logger.error("executor: a Job run failed", exc_info=error)
        elif run.result():
            self._finished.add(uid)

    async def _cancel(self, uid: str) -> None:
        """Cancel a Job's run and wait until its process is gone (without swallowing our own cancellation)."""
        run = self._runs.get(uid)
        if run is None:
            return
        run.cancel()
        await asyncio.wait({run})
        self._runs.pop(uid, None)

    # --- the Job controller --------------------------------------------------------------------------------------

    async def _run_job(self, job: dict[str, Any]) -> bool:
        """Run a Job to completion or failure; True once it has a terminal condition."""
        try:
            return await self._drive_job(job)
        except _JobGone:
            return False

    async def _drive_job(self, job: dict[str, Any]) -> bool:
        meta, spec = job["metadata"], job["spec"]
        pods = await self.client.list(PODS, meta["namespace"], label_selector=f"{JOB_UID_LABELS[0]}={meta['uid']}")
        failed = 0
        for pod in pods:
            phase = _phase(pod)
            if phase == "Succeeded":
                await self._complete(job, failed)
                return True
            if phase in ("Pending", "Running"):
                await self._pod_status(pod, {"phase": "Failed", "reason": INTERRUPTED, "message": "executor restarted"})
            elif (pod.get("status") or {}).get("reason") != INTERRUPTED:
                failed += 1
        status = job.get("status") or {}
        start = status.get("startTime") or now_rfc3339()
        update: dict[str, Any] = {"startTime": start, "active": 0}
        if (_condition(job, "Suspended") or {}).get("status") == "True":
            update["startTime"] = start = now_rfc3339()
            update["conditions"] = self._replace_condition(
                job, _new_condition("Suspended", "JobResumed", "Job resumed", "False")
            )
        await self._job_status(job, update)
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline = self._deadline(spec, start)
        active: dict[str, Any] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if failed > backoff_limit:
                        await self._fail(
                            job, failed, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                        )
                        return True
                    active = pod = await self._create_pod(job)
                    await self._job_status(job, {"active": 1, "ready": 0, **({"failed": failed} if failed else {})})
                    outcome = await self._run_pod(pod)
                    active = None
                    if outcome.exit_code == 0:
                        await self._complete(job, failed)
                        return True
                    action, index = policy_action(job, outcome.container, outcome.exit_code)
                    if action == "FailJob":
                        where = f"{meta['namespace']}/{pod['metadata']['name']}"
                        message = (
                            f"Container {outcome.container} for pod {where} failed with exit code "
                            f"{outcome.exit_code} matching FailJob rule at index {index}"
                        )
                        await self._fail(job, failed + 1, "PodFailurePolicy", message)
                        return True
                    if action != "Ignore":
                        failed += 1
                    await self._job_status(job, {"active": 0, "ready": 0, "failed": failed})
                    if self.retry_delay:
                        await asyncio.sleep(self.retry_delay)
        except TimeoutError:
            if deadline is None or asyncio.get_running_loop().time() < deadline:
                raise  # a client timeout, not the Job's deadline
            if active is not None:
                terminated = {"exitCode": 137, "reason": "DeadlineExceeded", "message": "", "finishedAt": now_rfc3339()}
                await self._pod_status(active, self._terminated_status(active, "Failed", terminated))
                failed += 1
            await self._fail(job, failed, "DeadlineExceeded", "Job was active longer than specified deadline")
            return True

    def _deadline(self, spec: dict[str, Any], start: str) -> float | None:
        seconds = spec.get("activeDeadlineSeconds")
        if seconds is None:
            return None
        remaining = (_parse_time(start) - datetime.datetime.now(datetime.UTC)).total_seconds() + float(seconds)
        return asyncio.get_running_loop().time() + max(remaining, 0.0)

    @staticmethod
    def _replace_condition(job: dict[str, Any], condition: dict[str, Any]) -> list[dict[str, Any]]:
        kept = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") != condition["type"]]
        return [*kept, condition]

    async def _complete(self, job: dict[str, Any], failed: int) -> None:
        message = "Reached expected number of succeeded pods"
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == "Suspended"] + [
            _new_condition("SuccessCriteriaMet", "CompletionsReached", message),
            _new_condition("Complete", "CompletionsReached", message),
        ]
        status = {"active": 0, "ready": 0, "succeeded": 1, "completionTime": now_rfc3339(), "conditions": conditions}
        if failed:
            status["failed"] = failed
        await self._job_status(job, status)

    async def _fail(self, job: dict[str, Any], failed: int, reason: str, message: str) -> None:
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == "Suspended"] + [
            _new_condition("FailureTarget", reason, message),
            _new_condition("Failed", reason, message),
        ]
        await self._job_status(job, {"active": 0, "ready": 0, "failed": failed, "conditions": conditions})

    async def _suspend(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        selector = f"{JOB_UID_LABELS[0]}={meta['uid']}"
        for pod in await self.client.list(PODS, meta["namespace"], label_selector=selector):
            if _phase(pod) in ("Pending", "Running"):
                await self.client.delete(PODS, meta["namespace"], pod["metadata"]["name"])
        condition = _new_condition("Suspended", "JobSuspended", "Job suspended")
        with contextlib.suppress(_JobGone):
            await self._job_status(job, {"active": 0, "conditions": self._replace_condition(job, condition)})

    async def _expire(self, job: dict[str, Any]) -> None:
        """The TTL controller: delete a finished Job `ttlSecondsAfterFinished` after it finished."""
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        status = job.get("status") or {}
        finished = status.get("completionTime") or (_condition(job, "Failed") or {}).get("lastTransitionTime")
        if finished and (datetime.datetime.now(datetime.UTC) - _parse_time(finished)).total_seconds() >= ttl:
            await self.client.delete(JOBS, job["metadata"]["namespace"], job["metadata"]["name"])

    async def _job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        meta = job["metadata"]
        try:
            await self.client.patch(JOBS, meta["namespace"], meta["name"], {"status": status}, subresource="status")
        except ApiError as exc:
            if exc.code == 404:
                raise _JobGone from exc
            raise

    # --- the kubelet ---------------------------------------------------------------------------------------------

    async def _create_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        template = job["spec"]["template"]
        template_meta = template.get("metadata") or {}
        labels = dict(template_meta.get("labels") or {})
        labels.update({key: meta["name"] for key in JOB_NAME_LABELS})
        labels.update({key: meta["uid"] for key in JOB_UID_LABELS})
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        spec = copy.deepcopy(template["spec"])
        spec["nodeName"] = "devcluster"
        while True:
            suffix = "".join(random.choices(string.ascii_lowercase, k=5))
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{meta['name']}-{suffix}",
                    "namespace": meta["namespace"],
                    "labels": labels,
                    "annotations": dict(template_meta.get("annotations") or {}),
                    "ownerReferences": [owner],
                },
                "spec": spec,
            }
            try:
                pod = await self.client.create(PODS, body, meta["namespace"])
                break
            except ApiError as exc:
                if exc.code != 409:
                    raise
        scheduled = _new_condition("PodScheduled", "Scheduled", "")
        await self._pod_status(pod, {"phase": "Pending", "conditions": [scheduled], "qosClass": "BestEffort"})
        return pod

    async def _read(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get_or_none(f"v1/{plural}", namespace, name)

    async def _prepare(self, pod: dict[str, Any]) -> PreparedContainer | Outcome:
        """Set the pod up, waiting (as the kubelet does) while a Secret or ConfigMap it needs is missing."""
        container = pod["spec"]["containers"][0]

        async def waiting(exc: PodSetupError) -> None:
            state = {"waiting": {"reason": exc.reason, "message": exc.message}}
            await self._pod_status(pod, {"containerStatuses": [self._container_status(pod, state)]})

        prepared = await prepare_until_ready(
            lambda: prepare_container(
                pod,
                self.root,
                self._read,
                api_env={KUBE_API_ENV: self.api_url},
                default_command=self.default_command,
                cpus=max(1, (os.cpu_count() or 1) // self._parallelism),
            ),
            waiting,
        )
        if isinstance(prepared, PodSetupError):
            return Outcome(container.get("name", "main"), 128, prepared.reason, prepared.message)
        return prepared

    async def _run_pod(self, pod: dict[str, Any]) -> Outcome:
        prepared = await self._prepare(pod)
        if isinstance(prepared, Outcome):
            terminated = {"exitCode": prepared.exit_code, "reason": prepared.reason, "message": prepared.message}
            await self._pod_status(pod, self._terminated_status(pod, "Failed", terminated))
            return prepared

        async def running(pid: int, started: str) -> None:
            state = {"running": {"startedAt": started}}
            await self._pod_status(
                pod,
                {
                    "phase": "Running",
                    "startTime": started,
                    "podIP": "127.0.0.1",
                    "hostIP": "127.0.0.1",
                    "containerStatuses": [self._container_status(pod, state, ready=True, pid=pid)],
                },
            )

        assert self._slots is not None
        log_path = self.root / "logs" / pod["metadata"]["namespace"] / f"{pod['metadata']['name']}.log"
        async with self._slots:
            exited = await run_process(prepared, log_path, running, kill_grace=self.kill_grace)
        phase = "Succeeded" if exited.exit_code == 0 else "Failed"
        await self._pod_status(pod, self._terminated_status(pod, phase, exited.terminated()))
        return Outcome(prepared.name, exited.exit_code, exited.reason, exited.message)

    @staticmethod
    def _container_status(
        pod: dict[str, Any], state: dict[str, Any], *, ready: bool = False, pid: int | None = None
    ) -> dict[str, Any]:
        return container_status(pod["spec"]["containers"][0], state, ready=ready, pid=pid)

    def _terminated_status(self, pod: dict[str, Any], phase: str, terminated: dict[str, Any]) -> dict[str, Any]:
        terminated = {key: value for key, value in terminated.items() if value not in ("", None)}
        return {"phase": phase, "containerStatuses": [self._container_status(pod, {"terminated": terminated})]}

    async def _pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):  # a pod deleted meanwhile (garbage-collected with its Job) is fine
            await self.client.patch(PODS, meta["namespace"], meta["name"], {"status": status}, subresource="status")
