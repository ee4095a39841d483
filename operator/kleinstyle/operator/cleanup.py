"""A deleted resource's cleanup: its children, and its artifacts when its spec says `artifactPolicy: Delete`.

The children are deleted explicitly, so no garbage collector is needed (the dev cluster has none); artifacts are
kept by default, and deleted only where the operator reaches the artifact store as a local folder.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from kleinstyle.contract.layout import owner_folder
from kleinstyle.contract.pod import local_path

from . import events, metrics
from .config import OperatorConfig
from .indexes import CHILD_KINDS, children_index
from .kinds import KIND_RUNS
from .kinds.base import owner_of
from .kube import Kube


async def delete_resource(body: Any, memo: Any, logger: Any, **indexes: Any) -> None:
    """Children go with their owner (explicitly, so no garbage collector is needed); artifacts stay unless asked."""
    meta = body["metadata"]
    kube: Kube = memo.kube
    for child_kind in reversed(CHILD_KINDS):
        for child in list(indexes[children_index(child_kind)].get(meta["uid"], ())):
            await kube.delete(child_kind, meta["namespace"], child["metadata"]["name"])
    metrics.forget(meta["namespace"], body["kind"], meta["name"])
    if (body.get("spec") or {}).get("artifactPolicy") != "Delete":
        return
    cfg: OperatorConfig = memo.config
    root = cfg.artifacts_local_path
    if root is None or cfg.artifacts.uri:
        message = "artifactPolicy is Delete, but the operator has no access to the artifact store"
        await events.post(kube, body, "Warning", "ArtifactsKept", message)
        return
    # Where the pod sees the artifacts volume (under KLEINSTYLE_ROOTFS when the dev cluster runs it as a process).
    folder = local_path(root) / owner_folder(owner_of(KIND_RUNS[body["kind"]].kind, body))
    await asyncio.to_thread(shutil.rmtree, folder, True)
    if folder.exists():
        await events.post(kube, body, "Warning", "ArtifactsKept", f"could not delete all artifacts in {folder}")
    else:
        logger.info(f"deleted artifacts in {folder}")
