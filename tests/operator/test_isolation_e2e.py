"""Isolation on the embedded cluster, one artifact claim behind every namespace as on one RWX filesystem: the
demo's board, LoRA and generation succeed while each pod reaches only its own run's folder and its inputs' (left as
they were), never another namespace's files, not even through a symlink on a reference claim."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import (
    ARTIFACT_CLAIM,
    REFERENCE_CLAIM,
    cluster_for,
    load_documents,
    local_artifact,
    write_model_cache,
)
from kleinstyle.devcluster.pod_setup import pod_rootfs
from kleinstyle.runtime.paths import local_path

pytestmark = pytest.mark.emulator

NS = "team-a"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOARD, LORA, GENERATION = (
    load_documents([str(EXAMPLES / f"{name}.yaml")])[0] for name in ("styleboard", "stylelora", "generationjob")
)
TEAM_B_RUN = "team-b/stylelora/b-lora/uid-b/0123456789"


async def succeeded(cluster, doc: dict) -> dict:
    """`doc` as the cluster holds it once it has Succeeded for its current spec."""
    plural = f"{doc['kind'].lower()}s"

    async def check() -> dict | None:
        obj = await cluster.get(plural, NS, doc["metadata"]["name"])
        status = (obj or {}).get("status") or {}
        done = status.get("phase") == "Succeeded" and status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if done else None

    return await cluster.wait_for(check, timeout=180)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: what a write would change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def mount_points(rootfs: Path) -> set[str]:
    """The artifact folders a pod's process reaches: the links its mounts became, as pod paths."""
    return {f"/{p.relative_to(rootfs)}" for p in (rootfs / "artifacts").rglob("*") if p.is_symlink()}


async def pod_of(cluster, job: str) -> Path:
    [pod] = await cluster.list("pods", NS, label_selector=f"job-name={job}")
    return pod_rootfs(cluster.root, NS, pod["metadata"]["name"])


async def test_runs_reach_their_own_and_their_inputs_folders_only(root: Path, monkeypatch: pytest.MonkeyPatch):
    write_model_cache(root)
    claim = root / "volumes" / ARTIFACT_CLAIM
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD])
        board = await succeeded(cluster, BOARD)
        board_run = Path(local_artifact(root, board["status"]["artifactURI"]))
        # Another namespace's LoRA on the same claim: a copy of a file whose place a pod could guess.
        (claim / TEAM_B_RUN).mkdir(parents=True)
        before = snapshot(board_run)

        await cluster.apply([LORA])
        lora = await succeeded(cluster, LORA)
        lora_run = Path(local_artifact(root, lora["status"]["artifactURI"]))
        shutil.copy(lora_run / "lora.safetensors", claim / TEAM_B_RUN / "lora.safetensors")
        trained = snapshot(lora_run)

        await cluster.apply([GENERATION])
        done = await succeeded(cluster, GENERATION)
        assert done["status"]["imagesDone"] == 2

        pvc = f"pvc://{ARTIFACT_CLAIM}/"
        board_path, lora_path, generation_path = (
            "/artifacts/" + obj["status"]["artifactURI"].removeprefix(pvc) for obj in (board, lora, done)
        )
        generation_pod = await pod_of(cluster, done["status"]["jobName"])
        assert mount_points(generation_pod) == {generation_path, lora_path}
        assert mount_points(await pod_of(cluster, lora["status"]["jobName"])) == {lora_path, board_path}
        assert mount_points(await pod_of(cluster, board["status"]["jobName"])) == {board_path.rsplit("/", 1)[0]}
        # Where the runtime would open team-b's LoRA from inside the generation pod, there is nothing.
        assert (claim / TEAM_B_RUN / "lora.safetensors").is_file()
        monkeypatch.setenv("KLEINSTYLE_ROOTFS", str(generation_pod))
        assert local_path(f"{lora_path}/lora.safetensors").is_file()
        assert not local_path(f"/artifacts/{TEAM_B_RUN}/lora.safetensors").exists()
        assert not local_path("/artifacts/team-b").exists()
        # Inputs are mounted read-only: training and generation left them as they were.
        assert snapshot(board_run) == before
        assert snapshot(lora_run) == trained


async def test_a_reference_symlink_into_another_namespace_is_rejected(root: Path):
    stolen = root / "volumes" / ARTIFACT_CLAIM / "team-b/styleboard/b/uid-b/0123456789/dataset/001.png"
    stolen.parent.mkdir(parents=True)
    shutil.copy(root / "volumes" / REFERENCE_CLAIM / "bd9" / "ref-01.png", stolen)
    link = root / "volumes" / REFERENCE_CLAIM / "bd9" / "borrowed.png"
    link.symlink_to(os.path.relpath(stolen, link.parent))
    board = {
        **BOARD,
        "spec": {
            **BOARD["spec"],
            "images": [*BOARD["spec"]["images"], {"source": f"pvc://{REFERENCE_CLAIM}/bd9/borrowed.png"}],
        },
    }
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([board])
        done = await succeeded(cluster, board)
    rejected = {r["source"]: r["reason"] for r in done["status"]["rejected"]}
    assert rejected[f"pvc://{REFERENCE_CLAIM}/bd9/borrowed.png"] == (
        f"leads outside its volume /references/{REFERENCE_CLAIM} (through a symlink); not allowed"
    )
    assert done["status"]["imagesAccepted"] == 8  # the example's own, as without the link
