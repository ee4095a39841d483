"""bench/chaos.py at its small size: the operator's resources run on the real control plane while the operator is
killed, kube-apiserver restarted, etcd paused, training pods killed mid-step and mid-checkpoint, a Job deleted, a
GPU node lost, watches cut and API errors dealt; nothing may be lost (the run's own invariants, read from its JSON).
The checks themselves are pure functions, held here to what they must catch."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kleinstyle.devcluster.controlplane import RealCluster, find_bin_dir
from kleinstyle.devcluster.node_agent import NodeAgent, NodeSpec

from .conftest import REPO, started_cluster
from .rbac import ensure_namespace, wait_for

BENCH = REPO / "bench"
SEED = 5


@pytest.fixture(scope="module")
def chaos_module() -> ModuleType:
    """bench/chaos.py as a module (it imports its sibling operator_scale by name, as a script does)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("chaos")


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    """One small chaos run's JSON summary."""
    bin_dir = find_bin_dir()
    if bin_dir is None or not (bin_dir / "helm").is_file():
        pytest.skip("no real control plane and helm: `make controlplane` builds them (docs/real-cluster.md)")
    command = [sys.executable, str(BENCH / "chaos.py"), "--size", "small", "--seed", str(SEED), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary (exit {result.returncode}):\n{result.stderr[-4000:]}"
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def test_nothing_is_lost_when_the_cluster_misbehaves(summary: dict[str, Any]) -> None:
    failed = [name for name, held in summary["invariants"].items() if not held]
    shown = {key: value for key, value in summary.items() if key not in ("final", "dealt")}  # what went wrong first
    assert not failed, f"invariants failed: {failed}\n{json.dumps(shown, indent=1)[:8000]}\n{summary['dealt']}"
    assert summary["not_where_they_must_end"] == []
    assert summary["duplicate_jobs"] == 0 and summary["runs_planned_twice"] == {}
    assert summary["checkpoints_lost"] == 0
    assert summary["half_written_artifacts"] == 0 and summary["artifact_files_checked"] > 0


def test_every_kind_of_fault_was_dealt_and_felt(summary: dict[str, Any]) -> None:
    kinds = {
        "operator-kill",
        "apiserver-restart",
        "etcd-pause",
        "pod-kill-step",
        "pod-kill-checkpoint",
        "job-delete",
        "node-loss",
        "watch-cut",
        "api-errors",
    }
    if summary["layers"]["kueue"] == "on":
        kinds.add("quota-cut")
    assert set(summary["faults"]) == kinds, summary["faults_missed"]
    assert summary["faults"]["operator-kill"] >= 3  # the scheduled ones, and one after everything settled
    assert summary["jobs_deleted_by_hand"] >= 1
    assert summary["resumed_pods"] >= 1, "no training pod resumed from a checkpoint: the kills hit nothing"
    assert sum(summary["api_faults_dealt"].values()) > 0
    lost = next(fault for fault in summary["dealt"] if fault["kind"] == "node-loss")
    assert "pods_gone_after_s" in lost, lost
    assert summary["phases"] == {
        "Succeeded": summary["resources"] - summary["planted_bad"],
        "Failed": summary["planted_bad"],
    }


def test_each_tenant_is_accounted(summary: dict[str, Any]) -> None:
    assert set(summary["events_per_tenant"]) == {"a", "b"}
    assert set(summary["gpu_seconds_pods"]) == {"a", "b"}
    for tenant, seconds in summary["gpu_seconds_pods"].items():
        assert seconds > 0, tenant


# --- what the chaos found -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RealCluster]:
    """A control plane of its own: its API server is stopped and restarted."""
    yield from started_cluster()


def test_a_pod_that_ends_while_the_api_server_is_away_is_reported_once_it_is_back(
    own_cluster: RealCluster, tmp_path: Path
) -> None:
    """The node agent reported a pod's end once, and a refused connection killed the pod's task: the pod read
    Running for ever, and its Job never made another. A kubelet keeps trying; so does the agent now."""
    cluster = own_cluster
    namespace = ensure_namespace(cluster, "away")
    solo = NodeSpec("kleinstyle-solo", {"cpu": "4", "memory": "8Gi", "pods": "10"}, labels={"pool": "solo"})
    path = f"/api/v1/namespaces/{namespace}/pods/sleeper"
    container = {"name": "main", "image": "runtime", "command": ["python", "-c", "import time; time.sleep(300)"]}
    spec = {"restartPolicy": "Never", "nodeSelector": {"pool": "solo"}, "containers": [container]}
    with NodeAgent(cluster, tmp_path, nodes=[solo], heartbeat=1.0) as agent:
        status, body = cluster.api(
            "POST", f"/api/v1/namespaces/{namespace}/pods", {"metadata": {"name": "sleeper"}, "spec": spec}
        )
        assert status == 201, body
        wait_for("the pod running", lambda: agent.pod_pid(namespace, "sleeper"), timeout=60)
        cluster.pause("kube-apiserver")
        try:
            assert agent.kill_pod(namespace, "sleeper")  # its end is reported to a server that does not answer
            time.sleep(2.0)
        finally:
            away = cluster.restart("kube-apiserver", kill=True)
        assert away > 0

        def phase() -> str:
            status, pod = cluster.api("GET", path)
            return str(pod["status"].get("phase")) if status == 200 else ""

        wait_for("the pod Failed", lambda: phase() == "Failed", timeout=60, interval=0.5)
        _, pod = cluster.api("GET", path)
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137  # SIGKILL


# --- the checks, on made-up records -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_duplicates_are_creations_beyond_one_per_run_and_hand_deletion(chaos_module: ModuleType) -> None:
    created = {"a-00/lora-1-train-abc": 3, "a-00/board-1-prepare-def": 1, "b-00/lora-1-train-abc": 2}
    assert chaos_module.duplicate_jobs(created, {"a-00/lora-1-train-abc": 1}) == {
        "a-00/lora-1-train-abc": 1,
        "b-00/lora-1-train-abc": 1,
    }
    assert chaos_module.duplicate_jobs(created, {"a-00/lora-1-train-abc": 2, "b-00/lora-1-train-abc": 1}) == {}
    assert chaos_module.runs_per_owner(
        ["a-00/lora-1-train-abc", "a-00/lora-1-train-fff", "a-00/gen-1-generate-a1"]
    ) == {"a-00/lora-1/train": 2}


@pytest.mark.unit
def test_job_creations_are_read_from_completed_audit_events(chaos_module: ModuleType) -> None:
    def event(stage: str, code: int, verb: str = "create", resource: str = "jobs") -> dict[str, Any]:
        ref = {"resource": resource, "namespace": "a-00", "name": "lora-1-train-abc"}
        return {"stage": stage, "verb": verb, "objectRef": ref, "responseStatus": {"code": code}}

    audit = [event("RequestReceived", 0), event("ResponseComplete", 201), event("ResponseComplete", 409)]
    audit += [event("ResponseComplete", 201, verb="delete"), event("ResponseComplete", 201, resource="configmaps")]
    assert chaos_module.job_creates(audit) == {"a-00/lora-1-train-abc": 1}


@pytest.mark.unit
def test_a_pod_that_trains_from_before_the_last_saved_step_loses_checkpoints(chaos_module: ModuleType) -> None:
    def log(*lines: str, hour: int = 19) -> str:
        return "\n".join(f"2026-12-07 {hour}:0{i}:00,000 INFO kleinstyle: {line}" for i, line in enumerate(lines))

    folder = "/artifacts/a-00/StyleLoRA/lora-1/u/r/work"  # as every pod mounts it; the node agent roots each pod's
    p1, p2 = (f"/tmp/n/pods/a-00/lora-1-train-r-{pod}{folder}" for pod in ("x1", "x2"))  # mounts in a folder of its own
    first = chaos_module.trace_pod(
        "p1",
        log(
            f"checkpoint step 5/30 loss 0.3 -> {p1}/checkpoints/step_000005",
            f"checkpoint step 10/30 loss 0.2 -> {p1}/checkpoints/step_000010",
        ),
    )
    resumed = chaos_module.trace_pod(
        "p2",
        log(
            f"resuming from {p2}/checkpoints/step_000010 (step 10 of 30)",
            f"checkpoint step 15/30 loss 0.1 -> {p2}/checkpoints/step_000015",
            hour=20,
        ),
    )
    assert (first.folder, first.saved, resumed.resumed_at) == (folder, (5, 10), 10)
    assert chaos_module.checkpoint_losses([resumed, first]) == []
    from_scratch = chaos_module.trace_pod(
        "p2", log(f"checkpoint step 5/30 loss 0.3 -> {folder}/checkpoints/step_000005", hour=20)
    )
    assert chaos_module.checkpoint_losses([first, from_scratch]) == [
        {"folder": folder, "pod": "p2", "saved": 10, "resumed_at": 0}
    ]
    stale = chaos_module.trace_pod("p2", log(f"resuming from {folder}/checkpoints/step_000005 (step 5 of 30)", hour=20))
    assert chaos_module.checkpoint_losses([first, stale])[0]["resumed_at"] == 5
    assert chaos_module.resumes([first, resumed, stale]) == 2


@pytest.mark.unit
def test_counters_reset_by_a_restart_still_add_up(chaos_module: ModuleType) -> None:
    assert chaos_module.counter_increase([0.0, 5.0, 9.0, 2.0, 4.0]) == 13.0  # 9, then a restart at 2, then 2 more
    samples = [{"a-00": 1.0}, {"a-00": 4.0, "b-00": 2.0}, {}, {"a-00": 3.0, "b-01": 1.0}]
    assert chaos_module.gpu_series(samples) == {"a": 6.0, "b": 3.0}
    series = [  # Prometheus' raw samples: each series counted from 0, a drop a restarted operator
        {"metric": {"namespace": "a-00", "kind": "StyleLoRA"}, "values": [[1, "2"], [2, "5"], [3, "1"]]},
        {"metric": {"namespace": "a-01", "kind": "GenerationJob"}, "values": [[2, "4"]]},
    ]
    assert chaos_module.prometheus_gpu(series) == {"a": 10.0}


@pytest.mark.unit
def test_gpu_seconds_must_agree_with_what_the_pods_held(chaos_module: ModuleType) -> None:
    now = 1000.0
    record = chaos_module.PodRecord
    killed = record("a-00", "p1", "train", "gpu-b", 1, started=100.0, finished=130.0, last_seen=140.0, gone_seen=142.0)
    lost = record("a-00", "p2", "train", "gpu-b", 1, started=200.0, last_seen=260.0, gone_seen=300.0)  # nobody said
    cpu = record("b-00", "p3", "prepare", "cpu", 0, started=0.0, finished=now, last_seen=now)
    held = chaos_module.pod_seconds([killed, lost, cpu])
    assert held == {"a": (90.0, 130.0)}  # the lost pod: seen until 260, found gone at 300
    assert chaos_module.gpu_disagreements({"a": 95.0}, held) == {}
    assert chaos_module.gpu_disagreements({"a": 160.0}, held) == {}  # counted until it went: within the bounds
    assert chaos_module.gpu_disagreements({"a": 250.0}, held) == {"a": (250.0, (90.0, 130.0))}  # gaps counted
    assert chaos_module.gpu_disagreements({}, held) == {"a": (0.0, (90.0, 130.0))}  # nothing counted at all
    assert [p["name"] for p in chaos_module.pods_of_tenants([cpu, lost, killed], ["a"])] == ["p1", "p2"]


@pytest.mark.unit
def test_a_half_written_file_is_found(chaos_module: ModuleType, tmp_path: Path) -> None:
    run = tmp_path / "a-00" / "StyleBoard" / "b" / "u" / "r"
    run.mkdir(parents=True)
    (run / "_SUCCESS").write_text("{}")
    (run / "metadata.json").write_text('{"step": "prep')  # cut short
    (run / "dataset").mkdir()
    (run / "dataset" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a header and no image
    staged = tmp_path / "a-00" / "StyleBoard" / "b" / "u" / ".r.tmp-1"
    staged.mkdir()
    (staged / "x.json").write_text("{")  # a killed writer's staging: no artifact
    lora = tmp_path / "a-00" / "StyleLoRA" / "l" / "u" / "r"
    lora.mkdir(parents=True)
    (lora / "lora.json").write_text("{}")
    problems, checked = chaos_module.artifact_problems(tmp_path, [run / "_SUCCESS", lora / "lora.safetensors"])
    assert checked == 4
    assert [problem.split(":")[0] for problem in problems] == [
        "a-00/StyleBoard/b/u/r/dataset/001.png",
        "a-00/StyleBoard/b/u/r/metadata.json",
        "a-00/StyleLoRA/l/u/r/lora.safetensors",
    ]
    assert problems[-1].endswith("not published")


@pytest.mark.unit
def test_the_plan_spreads_tenants_and_plants_bad_ones_the_operator_must_catch(chaos_module: ModuleType) -> None:
    planned = chaos_module.plan(200, 20)
    assert len(planned) == 200
    assert {item.doc["metadata"]["namespace"][0] for item in planned} == {"a", "b"}
    bad = [item for item in planned if item.bad_field]
    assert len(bad) == 5 and {item.doc["kind"] for item in bad} == {"StyleBoard", "StyleLoRA"}
    small = chaos_module.plan(12, 2)
    assert [item.doc["kind"] for item in small].count("LoRAFusion") == 2
    assert chaos_module.schedule(5, chaos_module.SIZES["small"]) == chaos_module.schedule(
        5, chaos_module.SIZES["small"]
    )
    assert chaos_module.schedule(5, chaos_module.SIZES["small"]) != chaos_module.schedule(
        6, chaos_module.SIZES["small"]
    )
