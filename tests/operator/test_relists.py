"""A Job deleted while the operator's watch was away (its DELETED event never came: kopf relisted) is found gone after
the relist and left out of what the next reconcile sees, so the run makes it again instead of waiting on it for ever.

Against the embedded cluster's API: the audit's GETs are real requests. The indexes are kopf's shape (owner uid ->
its children) as they stand after such a relist: the deleted Job still in them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.cluster import DevCluster
from kleinstyle.operator import relists
from kleinstyle.operator.indexes import CHILD_KINDS, children_index, objects_index
from kleinstyle.operator.kube import Kube
from kleinstyle.operator.naming import OWNER_UID
from kleinstyle.operator.observe import observe
from kleinstyle.operator.wakers import Wakers

pytestmark = [pytest.mark.emulator, pytest.mark.asyncio]
NS = "default"
OWNER = "owner-uid-1"


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {OWNER_UID: OWNER}},
        "spec": {
            "suspend": True,
            "template": {
                "metadata": {"labels": {OWNER_UID: OWNER}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]},
            },
        },
    }


def board() -> dict[str, Any]:
    spec = {"images": {"uri": "file:///refs"}, "triggerWord": "bd9style"}
    return {"kind": "StyleBoard", "metadata": {"name": "bd9", "namespace": NS, "uid": OWNER}, "spec": spec}


def indexes_with(*children: dict[str, Any]) -> dict[str, Any]:
    """kopf's indexes as a reconcile gets them: each child kind by owner uid, the StyleBoards by name."""
    found: dict[str, Any] = {children_index(kind): {} for kind in CHILD_KINDS}
    found[children_index("Job")] = {OWNER: [{**c, "apiVersion": "batch/v1", "kind": "Job"} for c in children]}
    found[objects_index("StyleBoard")] = {}
    return found


async def test_a_job_deleted_while_the_watch_was_away_is_tombstoned_and_left_out(tmp_path: Path) -> None:
    async with DevCluster(tmp_path, run_jobs=False, namespace=NS) as cluster:
        kept, deleted, old_remade = await cluster.apply([job("kept"), job("deleted"), job("remade")])
        await cluster.delete("jobs", NS, "deleted")
        await cluster.delete("jobs", NS, "remade")
        [new_remade] = await cluster.apply([job("remade")])  # a new object under the old name: another uid
        indexes = indexes_with(kept, deleted, old_remade)
        wakers = Wakers()
        woken = wakers.event(OWNER)

        buried = await relists.audit(wakers, Kube(), indexes)

        assert sorted(obj["metadata"]["name"] for obj in buried) == ["deleted", "remade"]
        assert wakers.tombstones == {deleted["metadata"]["uid"], old_remade["metadata"]["uid"]}
        assert woken.is_set()
        seen = {c["metadata"]["name"] for c in observe(board(), indexes, wakers).children}
        assert seen == {"kept"}, "the reconcile must not see the Jobs that are gone"
        assert new_remade["metadata"]["uid"] not in wakers.tombstones
        # Once kopf forgets them (their entries leave the index), so do the tombstones.
        assert await relists.audit(wakers, Kube(), indexes_with(kept)) == []
        assert not wakers.tombstones


async def test_the_audit_waits_for_a_bursts_end_then_runs_once(tmp_path: Path) -> None:
    async with DevCluster(tmp_path, run_jobs=False, namespace=NS) as cluster:
        first, second = await cluster.apply([job("first"), job("second")])
        await cluster.delete("jobs", NS, "second")
        indexes = indexes_with(first, second)
        wakers = Wakers()
        relists.note(wakers, Kube(), "MODIFIED", indexes)  # a watched event: no listing
        assert wakers.listing is None
        relists.note(wakers, Kube(), None, indexes)  # a relist's burst starts
        listing = wakers.listing
        assert listing is not None and listing.task is not None
        await asyncio.sleep(relists.QUIET_S / 2)
        relists.note(wakers, Kube(), None, indexes)  # ... and goes on
        assert wakers.listing is listing
        await asyncio.sleep(relists.QUIET_S * 0.75)
        assert not listing.task.done()  # the quiet moment counts from the last listed event
        await asyncio.wait_for(listing.task, relists.QUIET_S * 3)
        assert wakers.tombstones == {second["metadata"]["uid"]} and wakers.listing is None
