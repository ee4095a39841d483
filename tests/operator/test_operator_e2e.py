"""The operator for real: kopf against the API emulator, Jobs run by the local executor, the prepare runtime.

Each test applies resources as kubectl would and reads back what a user would see (status, events, children,
artifacts), plus the emulator's request log where the claim is about requests (each child created exactly once).
"""

from __future__ import annotations

import asyncio
import copy
import time
from functools import partial
from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import (
    REFERENCE_CLAIM,
    cluster_for,
    dev_config,
    embedded_operator,
    local_artifact,
    write_model_cache,
)
from kleinstyle.operator import metrics
from kleinstyle.operator.kube import Kube

pytestmark = pytest.mark.emulator

NS = "team-a"
CHILDREN = ("serviceaccounts", "roles", "rolebindings", "configmaps", "jobs")

BOARD = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleBoard",
    "metadata": {"name": "bd9"},
    "spec": {
        "triggerWord": "bd9style",
        "images": [
            {"source": f"pvc://{REFERENCE_CLAIM}/bd9/ref-0{i}.png", "caption": f"subject {i}"} for i in range(1, 6)
        ]
        + [{"source": f"pvc://{REFERENCE_CLAIM}/bd9/thumbnail.png"}],
        "captioning": {"provider": "none"},
    },
}
LORA = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleLoRA",
    "metadata": {"name": "bd9-lora"},
    "spec": {"boardRef": {"name": "bd9"}},
}


def phase_is(cluster, plural: str, name: str, *phases: str):
    async def check():
        obj = await cluster.get(plural, NS, name)
        status = (obj or {}).get("status") or {}
        current = status.get("observedGeneration") == obj["metadata"].get("generation") if obj else False
        return obj if obj and current and status.get("phase") in phases else None

    return check


def children_of(cluster, uid: str) -> dict[str, list[str]]:
    selector = f"kleinstyle.dev/owner-uid={uid}"
    return {
        plural: sorted(o["metadata"]["name"] for o in cluster.emulator.list(plural, NS, label_selector=selector))
        for plural in CHILDREN
    }


async def test_board_is_prepared_and_its_status_tells_the_story(root: Path):
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD])
        board = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)
        status = board["status"]
        assert status["imagesAccepted"] == 5 and status["imagesRejected"] == 1
        assert status["rejected"][0]["source"] == f"pvc://{REFERENCE_CLAIM}/bd9/thumbnail.png"
        assert "too small" in status["rejected"][0]["reason"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["observedGeneration"]) == ("True", board["metadata"]["generation"])
        dataset = Path(local_artifact(root, status["datasetURI"]))
        captions = sorted(p.read_text() for p in dataset.glob("*.txt"))
        assert len(list(dataset.glob("*.png"))) == 5
        assert captions[0].startswith("bd9style") and "subject" in captions[0]

        # Events are posted after the status patch that goes with them: a moment later under load.
        def reasons() -> list[str]:
            return [e["reason"] for e in cluster.emulator.list("events", NS) if e["involvedObject"]["name"] == "bd9"]

        await cluster.wait_for(lambda: {"JobCreated", "JobComplete"} <= set(reasons()), timeout=10)

        # The operator records its metrics once its status patch has landed, so the gauge may trail what a reader of
        # the status sees by a moment (under load, a visible one): wait for it rather than race it.
        sample = metrics.REGISTRY.get_sample_value
        succeeded = {"namespace": NS, "kind": "StyleBoard", "name": "bd9", "phase": "Succeeded"}
        await cluster.wait_for(lambda: sample("kleinstyle_resource_phase", succeeded) == 1, timeout=10)
        assert sample("kleinstyle_children_created_total", {"kind": "StyleBoard", "child": "Job"}) >= 1

        # Without a model in the model cache the StyleLoRA's Job fails at once (exit 2), naming what is missing.
        await cluster.apply([LORA])
        lora = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Failed"), timeout=60)
        message = lora["status"]["message"]
        assert "exit code 2" in message and "model_index.json missing" in message


async def test_a_lora_trains_for_real_and_status_points_at_it(root: Path):
    write_model_cache(root)  # the tiny random klein, where the model-cache volume keeps klein-base-9b
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD, LORA])
        lora = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Succeeded"), timeout=120)
        status = lora["status"]
        limit = dev_config(root).training_limits.max_steps
        assert status["loraURI"] == f"{status['artifactURI']}/lora.safetensors"
        assert Path(local_artifact(root, status["loraURI"])).is_file()
        assert (status["step"], status["totalSteps"], status["stopReason"]) == (limit, limit, "completed")
        assert status["progressText"] == f"{limit}/{limit} (100%)" and status["loss"] > 0
        assert [c["step"] for c in status["checkpoints"]] == [10, 20, 30]
        assert all(Path(local_artifact(root, c["uri"])).is_dir() for c in status["checkpoints"])
        assert "capped at 30" in status["plan"]["stepsReason"]
        # Every checkpoint is scored; the best one, by the same policy the runtime applied, is the LoRA.
        assert all(isinstance(c["score"], float) for c in status["checkpoints"])
        best = status["bestCheckpoint"]
        assert best in (10, 20, 30) and status["earlyStopping"]
        published = Path(local_artifact(root, status["loraURI"])).read_bytes()
        chosen = next(c for c in status["checkpoints"] if c["step"] == best)
        assert published == (Path(local_artifact(root, chosen["uri"])) / "lora.safetensors").read_bytes()


GENERATION = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "GenerationJob",
    "metadata": {"name": "bd9-samples"},
    "spec": {"loras": [{"name": "bd9-lora", "weight": 0.9}], "prompts": ["a fox at night"], "count": 2},
}


async def test_a_generation_job_renders_with_the_lora_it_waited_for(root: Path):
    from kleinstyle.runtime.pngmeta import read_png_metadata

    write_model_cache(root)
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([GENERATION, BOARD, LORA])  # the job first: it waits for its LoRA, then renders
        done = await cluster.wait_for(phase_is(cluster, "generationjobs", "bd9-samples", "Succeeded"), timeout=180)
        status = done["status"]
        limits = dev_config(root).generation_limits
        assert (status["render"]["width"], status["render"]["steps"]) == (limits.max_side, limits.max_steps)
        assert status["render"]["triggerWords"] == ["bd9style"]
        assert [(i["promptIndex"], i["seed"]) for i in status["images"]] == [(1, 0), (1, 1)]
        for image in status["images"]:
            assert image["uri"].startswith(status["artifactURI"] + "/images/") and image["seconds"] > 0
            record = read_png_metadata(Path(local_artifact(root, image["uri"])))
            assert record["prompt_used"] == status["prompts"][0]["promptUsed"]
            assert record["loras"] == [{"lora": "StyleLoRA/bd9-lora", "weight": 0.9}]
        assert status["prompts"][0]["promptUsed"].startswith("bd9style. a fox at night")
        assert Path(local_artifact(root, status["contactSheetURI"])).is_file()
        assert (status["imagesDone"], status["imagesTotal"]) == (2, 2)
        warning = next(c for c in status["conditions"] if c["type"] == "Warning")
        assert "capped" in warning["message"] and "reformulation is unavailable" in warning["message"]


async def test_two_trained_loras_fuse_and_status_says_how(root: Path):
    from kleinstyle.runtime.klein.lora_io import read_lora

    write_model_cache(root)
    ink = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleLoRA",
        "metadata": {"name": "ink-lora"},
        "spec": {"boardRef": {"name": "bd9"}, "training": {"rank": 16, "targetBlocks": "single"}},
    }
    fusion = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "LoRAFusion",
        "metadata": {"name": "bd9-ink"},
        "spec": {"sources": [{"name": "bd9-lora", "weight": 0.6}, {"name": "ink-lora", "weight": 0.4}], "rank": 24},
    }
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD, LORA, ink, fusion])
        done = await cluster.wait_for(phase_is(cluster, "lorafusions", "bd9-ink", "Succeeded"), timeout=240)
        status = done["status"]
        assert status["loraURI"] == f"{status['artifactURI']}/lora.safetensors"
        fused = read_lora(local_artifact(root, status["loraURI"]))
        assert status["rank"] == fused.max_rank == 24  # 32 + 16 truncated to 24
        assert 0.5 < status["energyKept"] < 1 and status["durationSeconds"] > 0
        # ink-lora trained single blocks only: the double blocks hold bd9-lora's update alone, and status says so.
        warning = next(c for c in status["conditions"] if c["type"] == "Warning")
        assert warning["status"] == "True" and "only some inputs" in warning["message"]
        assert len(fused.layers) == len(
            read_lora(
                local_artifact(root, (await cluster.get("styleloras", NS, "bd9-lora"))["status"]["loraURI"])
            ).layers
        )


async def test_a_lora_waits_for_its_board_with_a_condition(root: Path):
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([LORA])
        lora = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Waiting"), timeout=30)
        deps = next(c for c in lora["status"]["conditions"] if c["type"] == "DependenciesReady")
        assert (deps["status"], deps["reason"]) == ("False", "StyleBoardNotFound")
        assert "StyleBoard bd9" in deps["message"]


async def test_a_failing_run_reports_the_pods_reason(root: Path):
    board = copy.deepcopy(BOARD)
    board["spec"]["images"] = [{"source": f"pvc://{REFERENCE_CLAIM}/bd9/thumbnail.png"}]  # nothing acceptable
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([board])
        failed = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Failed"), timeout=90)
        message = failed["status"]["message"]
        # Exit code 2 (input that cannot succeed) fails the Job at once through the podFailurePolicy.
        assert "PodFailurePolicy" in message and "exit code 2" in message
        assert "no usable images" in message and "too small" in message


async def test_spec_change_replaces_the_run_and_deletion_removes_children(root: Path):
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD])
        first = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)
        uid, first_job = first["metadata"]["uid"], first["status"]["jobName"]

        changed = copy.deepcopy(BOARD)
        changed["spec"]["triggerWord"] = "newstyle"
        await cluster.apply([changed])
        second = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)
        assert second["status"]["jobName"] != first_job
        assert second["status"]["datasetURI"] != first["status"]["datasetURI"]
        kids = children_of(cluster, uid)
        assert kids["jobs"] == [second["status"]["jobName"]]
        assert kids["configmaps"] == [second["status"]["jobName"]]
        first_dataset = Path(local_artifact(root, first["status"]["datasetURI"]))
        assert first_dataset.is_dir()  # artifacts are kept (artifactPolicy Retain)

        await cluster.delete("styleboards", NS, "bd9")
        await cluster.wait_for(lambda: cluster.emulator.get("styleboards", NS, "bd9") is None, timeout=30)
        assert children_of(cluster, uid) == {plural: [] for plural in CHILDREN}
        assert first_dataset.is_dir()


async def test_artifact_policy_delete_removes_the_artifacts(root: Path):
    board = copy.deepcopy(BOARD)
    board["spec"]["artifactPolicy"] = "Delete"
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([board])
        done = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)
        dataset = Path(local_artifact(root, done["status"]["datasetURI"]))
        assert dataset.is_dir()
        await cluster.delete("styleboards", NS, "bd9")
        await cluster.wait_for(lambda: cluster.emulator.get("styleboards", NS, "bd9") is None, timeout=30)
        assert not dataset.exists()


class CrashBeforeJobs(Kube):
    """The operator's API shell, failing every Job create: an operator that dies after creating the RunSpec
    ConfigMap and RBAC but before the Job."""

    async def create(self, obj: dict) -> bool:
        if obj["kind"] == "Job":
            raise RuntimeError("operator crashed before creating the Job")
        return await super().create(obj)


async def test_operator_restarts_never_duplicate_children(root: Path):
    async with cluster_for(root, NS, kube=CrashBeforeJobs()) as cluster:
        await cluster.apply([BOARD])
        await cluster.wait_for(lambda: cluster.emulator.list("configmaps", NS), timeout=30)
        board = cluster.emulator.get("styleboards", NS, "bd9")
        assert children_of(cluster, board["metadata"]["uid"])["jobs"] == []

        # Restart between child creations: a healthy operator takes over.
        await cluster.stop_operator()
        await cluster.start_operator(partial(embedded_operator, dev_config(root), NS))

        # Restart as soon as every child exists, while the Job is still pending or running.
        await cluster.wait_for(lambda: cluster.emulator.list("jobs", NS), timeout=30)
        await cluster.restart_operator()
        done = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)

        # And once more after it finished, letting it resync a few times.
        await cluster.restart_operator()
        await asyncio.sleep(2.0)
        assert (await cluster.get("styleboards", NS, "bd9"))["status"]["phase"] == "Succeeded"

        kids = children_of(cluster, done["metadata"]["uid"])
        job = done["status"]["jobName"]
        runner = "bd9-prepare-runner"
        assert (kids["jobs"], kids["configmaps"]) == ([job], [job])
        # The finished run's ServiceAccount, Role and RoleBinding are gone: it may no longer write status.
        assert kids["serviceaccounts"] == kids["roles"] == kids["rolebindings"] == []
        for plural, name in [("jobs", job), ("configmaps", job), *((p, runner) for p in CHILDREN[:3])]:
            # Each child was POSTed once: no duplicate, not even a create attempt answered 409.
            assert cluster.emulator.count_creates(plural, name, NS, attempts=True) == 1, plural


async def test_a_planted_child_blocks_the_run_instead_of_being_adopted(root: Path):
    from kleinstyle.operator.kinds import KIND_RUNS

    kind_run = KIND_RUNS["StyleBoard"]
    body = {**copy.deepcopy(BOARD), "metadata": {"name": "bd9", "namespace": NS, "uid": "not-known-yet"}}
    spec = kind_run.kind.spec.model_validate(BOARD["spec"])
    name = kind_run.build(body, spec, {}, dev_config(root)).name  # names are predictable
    planted = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"runspec.json": "{}"}}
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([planted, BOARD])
        board = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Pending"), timeout=30)
        await asyncio.sleep(1.0)  # a few resyncs
        ready = next(c for c in board["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "ChildConflict"
        assert cluster.emulator.list("jobs", NS) == []


async def test_bad_yaml_is_refused_at_apply_with_causes_kubectl_lists(root: Path):
    from kleinstyle.devcluster import ApiError

    bad = copy.deepcopy(LORA)
    bad["spec"]["training"] = {"rank": 48}
    async with cluster_for(root, NS) as cluster:
        with pytest.raises(ApiError) as refused:
            await cluster.apply([bad])
    assert refused.value.code == 422 and "spec.training.rank" in refused.value.message
    assert refused.value.details["causes"][0]["field"] == "spec.training.rank"


async def test_a_jobs_completion_reaches_status_at_once_without_a_resync(root: Path):
    """Watch, don't poll: with the safety-net resync an hour away, the Job's completion wakes its owner."""
    config = dev_config(root).model_copy(update={"resync_seconds": 3600.0})
    async with cluster_for(root, NS, config=config) as cluster:
        await cluster.apply([BOARD])

        def completed_job():
            jobs = cluster.emulator.list("jobs", NS)
            done = [
                j for j in jobs if any(c["type"] == "Complete" for c in (j.get("status") or {}).get("conditions", []))
            ]
            return done[0] if done else None

        job = await cluster.wait_for(completed_job, timeout=60, interval=0.02)
        seen = time.monotonic()
        board = await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=5, interval=0.02)
        assert time.monotonic() - seen < 1.0
        assert board["status"]["jobName"] == job["metadata"]["name"]


async def test_fusions_naming_each_other_stall_and_a_missing_reference_warns(root: Path):
    def fusion(name: str, other: str) -> dict:
        sources = [{"kind": "LoRAFusion", "name": other}, {"name": "ink-lora"}]
        return {
            "apiVersion": "kleinstyle.dev/v1alpha1",
            "kind": "LoRAFusion",
            "metadata": {"name": name},
            "spec": {"sources": sources},
        }

    async with cluster_for(root, NS) as cluster:
        await cluster.apply([fusion("a", "b"), fusion("b", "a")])
        for name, chain in (
            ("a", "LoRAFusion a -> LoRAFusion b -> LoRAFusion a"),
            ("b", "LoRAFusion b -> LoRAFusion a"),
        ):
            stalled = await cluster.wait_for(phase_is(cluster, "lorafusions", name, "Waiting"), timeout=30)
            conds = {c["type"]: c for c in stalled["status"]["conditions"]}
            assert conds["Ready"]["reason"] == "DependencyCycle" and chain in stalled["status"]["message"]
            assert conds["Stalled"]["status"] == "True"
        await cluster.apply([GENERATION])  # its LoRA does not exist
        waiting = await cluster.wait_for(phase_is(cluster, "generationjobs", "bd9-samples", "Waiting"), timeout=30)
        warning = next(c for c in waiting["status"]["conditions"] if c["type"] == "Warning")
        assert warning["status"] == "True" and "StyleLoRA bd9-lora does not exist" in warning["message"]
        events = [e for e in cluster.emulator.list("events", NS) if e["involvedObject"]["name"] == "bd9-samples"]
        assert [e["type"] for e in events] == ["Warning"]
