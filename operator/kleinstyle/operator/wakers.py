"""What this process remembers between reconciles: who to wake on which event, and its own writes in flight.

The indexes lag the API by one watch event. A child created or status written here is remembered until its watch
event reaches the index, so a reconcile woken in between neither creates the child again nor writes the same patch
or Event twice; and a reconcile that keeps failing backs off and warns once in a while, not at every try. Memory
only: the first reconcile after a restart rebuilds it from the indexes.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

ERROR_BACKOFF_S = 5.0  # after an API refusal or a bug: try again this soon, not at the next slow resync
MAX_ERROR_BACKOFF_S = 300.0  # ... twice as long each time the same error repeats, up to this
WARNING_INTERVAL_S = 600.0  # one Warning Event per object and reason this often at most, however often it fails

ChildKey = tuple[str, str]  # a child's (kind, name)


@dataclass
class Wakers:
    """Who to wake on which event, in this process's memory (rebuilt by the first reconcile after a restart)."""

    events: dict[str, asyncio.Event] = field(default_factory=dict)  # resource uid -> its daemon's wake-up
    waiting_on: dict[tuple[str, str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    # Children this process created or deleted whose watch event has not reached the index yet, by owner uid.
    created: dict[str, dict[ChildKey, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    deleted: dict[str, set[ChildKey]] = field(default_factory=lambda: defaultdict(set))
    # The status this process last wrote, with the resourceVersion the write made, until the watch brings it back:
    # a reconcile woken in between compares with it, so it neither writes the same patch nor posts the same Event
    # twice.
    written: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    job_owner: dict[str, str] = field(default_factory=dict)  # a Job's uid -> its owner's uid (Workload events)
    # Resources that wait on their namespace's models-pull Job (models_gate), by namespace: `pulls` lists it for
    # those namespaces and wakes them when it changes.
    waiting_models: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # The models-pull Jobs and their pods of each of those namespaces, as last listed (None until then).
    pulls: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = field(default_factory=dict)
    pulls_wanted: asyncio.Event = field(default_factory=asyncio.Event)  # a namespace to list now
    # Reconciles that failed, by uid: the last error and how many times in a row it came (each retry waits longer),
    # and when a Warning Event of each reason was last posted (time.monotonic()).
    failures: dict[str, tuple[str, int]] = field(default_factory=dict)
    warned: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    # Uids of indexed objects found gone after a watch relisted (relists.py): kopf never saw their DELETED event.
    tombstones: set[str] = field(default_factory=set)
    listing: Any = None  # relists.Listing: the burst of listed events now coming, if any

    def event(self, uid: str) -> asyncio.Event:
        return self.events.setdefault(uid, asyncio.Event())

    def wake(self, uid: str) -> None:
        if uid in self.events:
            self.events[uid].set()

    def current(self, body: Any) -> dict[str, Any]:
        """`body`, with the status this process last wrote when the watch has not brought that write back yet."""
        uid, seen = body["metadata"]["uid"], body["metadata"].get("resourceVersion") or ""
        if uid not in self.written:
            return dict(body)
        version, status = self.written[uid]
        if _not_older(seen, version):
            del self.written[uid]
            return dict(body)
        return {**body, "status": {**(body.get("status") or {}), **status}}

    def failed(self, uid: str, error: str) -> float:
        """Count a failed reconcile; the seconds until the next try: ERROR_BACKOFF_S, doubled each time the same
        `error` comes again, up to MAX_ERROR_BACKOFF_S (a different error starts over)."""
        last, times = self.failures.get(uid, ("", 0))
        times = times + 1 if last == error else 1
        self.failures[uid] = (error, times)
        return float(min(ERROR_BACKOFF_S * 2 ** min(times - 1, 30), MAX_ERROR_BACKOFF_S))

    def succeeded(self, uid: str) -> None:
        self.failures.pop(uid, None)

    def may_warn(self, uid: str, reason: str, now: float) -> bool:
        """Whether a Warning Event with `reason` about `uid` may be posted at `now` (and, if so, that it was): one
        per WARNING_INTERVAL_S, so a failure retried for hours is one Event every few minutes, not one per try."""
        last = self.warned[uid].get(reason)
        if last is not None and now - last < WARNING_INTERVAL_S:
            return False
        self.warned[uid][reason] = now
        return True

    def forget(self, uid: str) -> None:
        tables: tuple[dict[str, Any], ...] = (
            self.events,
            self.created,
            self.deleted,
            self.written,
            self.failures,
            self.warned,
        )
        for table in tables:
            table.pop(uid, None)
        for job_uid in [job for job, owner in self.job_owner.items() if owner == uid]:
            del self.job_owner[job_uid]
        for waiting in self.waiting_models.values():
            waiting.discard(uid)

    def wake_namespace(self, namespace: str) -> None:
        """Wake the resources of `namespace` that wait on its models-pull Job."""
        for uid in self.waiting_models.get(namespace, set()).copy():
            self.wake(uid)


def _not_older(seen: str, written: str) -> bool:
    """resourceVersions are opaque, but etcd's (and the emulator's) are increasing integers; otherwise equality."""
    if seen.isdigit() and written.isdigit():
        return int(seen) >= int(written)
    return seen == written
