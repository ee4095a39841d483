"""Index entries a watch's relist leaves behind, checked and set aside.

kopf keeps an index entry until the object's DELETED event comes. When a watch cannot resume where it stopped (410
Gone: kube-apiserver restarted and lost its watch cache, or the operator's resourceVersion grew too old), kopf lists
the resource again and watches from there; an object deleted in between never gets its DELETED event, and its entry
stays for good. A run whose Job was deleted then would wait on a Job that is not there, for ever (the chaos run
found it: a Job deleted by hand 2 s before kube-apiserver was killed stayed "running" until the operator restarted).

A listing comes as a burst of events of type None (kopf's convention). A moment after the last of a burst
(`QUIET_S`), the audited indexes (the runs' children, their pods, Kueue's Workloads) are compared with the API: one
label-selected list per kind and namespace, and a GET of each entry missing from it; one that is gone (404, or another
object under its name) gets a tombstone: `observe` leaves tombstoned uids out, and the owner is woken to act on it.
An API server restart relists every watch, the runs' own kinds among them, so a burst comes even when the deleted
Job was the only one of its kind. The operator's start is a listing too, audited like any other: at most one list per
kind and namespace where it already has runs (none when it starts on an empty cluster), then nothing is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from . import kueue
from .indexes import CHILD_KINDS, PODS_INDEX, WORKLOADS_INDEX, children_index
from .kube import Kube, collection_path
from .naming import OWNER_UID
from .wakers import Wakers

QUIET_S = 2.0  # no listed event for this long: the burst is over
AUDITED = (*(children_index(kind) for kind in CHILD_KINDS), PODS_INDEX, WORKLOADS_INDEX)

logger = logging.getLogger(__name__)


def note(wakers: Wakers, kube: Kube, event_type: str | None, indexes: Mapping[str, Any]) -> None:
    """Record a watch event: a listed one (type None) starts or extends a burst, audited once it is over."""
    if event_type is not None:
        return
    listing = wakers.listing
    if listing is None:
        listing = wakers.listing = Listing()
        listing.task = asyncio.create_task(_audit_after_quiet(wakers, kube, listing, indexes), name="relist audit")
    listing.last = asyncio.get_running_loop().time()


class Listing:
    """One burst of listed events: when its last one came, and the audit that waits for its end."""

    def __init__(self) -> None:
        self.last = 0.0
        self.task: asyncio.Task[None] | None = None


def entries(indexes: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The entries of the audited indexes."""
    for name in AUDITED:
        for store in (indexes.get(name) or {}).values():
            yield from store


def collection_of(obj: Mapping[str, Any]) -> str:
    """The REST path of `obj`'s collection in its namespace (kube.PLURALS' kinds, and Kueue's Workloads)."""
    namespace = obj["metadata"]["namespace"]
    if obj["kind"] == "Workload":
        return f"/apis/{obj['apiVersion']}/namespaces/{namespace}/workloads"
    return collection_path(obj["kind"], namespace)


async def gone(kube: Kube, obj: Mapping[str, Any]) -> bool:
    """Whether `obj` is no longer there: 404, or another object (another uid) under its name. Unsure is not gone."""
    try:
        found: dict[str, Any] | None = await kube.request("GET", f"{collection_of(obj)}/{obj['metadata']['name']}")
    except ApiException as exc:
        return bool(exc.status == 404)
    return found is not None and str(found["metadata"].get("uid")) != str(obj["metadata"]["uid"])


async def audit(wakers: Wakers, kube: Kube, indexes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tombstone every audited entry the API no longer has, and wake its owner; returns the tombstoned entries.

    One label-selected list per kind and namespace finds the candidates (the listing kopf made is not at hand, and a
    burst can hold several rounds of it); each is read once more before it is buried, since what was created after
    the list is missing from it too."""
    indexed = list(entries(indexes))
    # A tombstone is kept while its entry is in an index: once kopf forgets the object, so does this.
    wakers.tombstones &= {obj["metadata"].get("uid") for obj in indexed}
    collections: dict[str, list[dict[str, Any]]] = {}
    for obj in indexed:
        if obj["metadata"].get("uid") not in wakers.tombstones:
            collections.setdefault(collection_of(obj), []).append(obj)
    buried = []
    for collection, objs in collections.items():
        selector = kueue.JOB_UID_LABEL if objs[0]["kind"] == "Workload" else OWNER_UID
        listed = await kube.request("GET", collection, query=[("labelSelector", selector)])
        present = {item["metadata"]["uid"] for item in (listed or {}).get("items") or []}
        for obj in objs:
            if obj["metadata"]["uid"] in present or not await gone(kube, obj):
                continue
            meta = obj["metadata"]
            wakers.tombstones.add(meta["uid"])
            buried.append(obj)
            logger.info(f"{obj['kind']} {meta['namespace']}/{meta['name']} was deleted while a watch was away")
            labels = meta.get("labels") or {}  # a child's owner by label; a Workload's through its Job's uid
            owner = labels.get(OWNER_UID) or wakers.job_owner.get(labels.get(kueue.JOB_UID_LABEL, ""))
            if owner:
                wakers.wake(owner)
    checked = sum(len(objs) for objs in collections.values())
    logger.info(f"after a relist, checked {checked} indexed objects in {len(collections)} lists: {len(buried)} gone")
    return buried


async def _audit_after_quiet(wakers: Wakers, kube: Kube, listing: Listing, indexes: Mapping[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    while (wait := listing.last + QUIET_S - loop.time()) > 0:
        await asyncio.sleep(wait)
    wakers.listing = None  # a later listed event starts the next burst
    try:
        await audit(wakers, kube, indexes)
    except Exception as exc:  # the entries stay as they were; the next relist looks again
        logger.warning(f"could not check the index entries a relist left behind: {exc!r}")
