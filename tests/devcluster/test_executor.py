"""The local executor: Jobs become Pods and processes, with the real controllers' status."""

from __future__ import annotations

import json
import os
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster import DevCluster, Executor

pytestmark = pytest.mark.emulator

WRITE_SCRIPT = textwrap.dedent(
    """
    import os, pathlib
    root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
    (root / "data" / "out.txt").write_text(os.environ["TOKEN"] + " " + os.environ["POD"] + " " + os.environ["MODE"])
    (root / "config" / "mode").read_text()
    (root / "dev" / "termination-log").write_text("wrote out.txt")
    """
)


def job(name: str, script: str, *, env: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "runtime", "command": ["python", "-c", script], "env": env or []}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "test"}},
                "spec": {"restartPolicy": "Never", "containers": [container]},
            }
        }
        | spec,
    }


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == kind and item["status"] == "True":
            return item
    return None


async def finished(cluster: DevCluster, name: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await cluster.get("jobs", "default", name)
        return found if condition(found, "Complete") or condition(found, "Failed") else None

    return await cluster.wait_for(check, timeout=timeout)


async def test_a_job_runs_with_volumes_env_and_termination_message(tmp_path: Path) -> None:
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply(
            [
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "t0k"}},
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"mode": "fast"}},
            ]
        )
        spec = job(
            "write",
            WRITE_SCRIPT,
            env=[
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "UNSET", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": True}}},
            ],
        )
        pod_spec = spec["spec"]["template"]["spec"]
        pod_spec["containers"][0]["volumeMounts"] = [
            {"name": "data", "mountPath": "/data"},
            {"name": "config", "mountPath": "/config"},
        ]
        pod_spec["volumes"] = [
            {"name": "data", "persistentVolumeClaim": {"claimName": "artifacts"}},
            {"name": "config", "configMap": {"name": "cfg"}},
        ]
        await cluster.apply([spec])
        done = await finished(cluster, "write")

        assert condition(done, "Complete")["reason"] == "CompletionsReached"
        status = done["status"]
        assert (status["succeeded"], status["active"]) == (1, 0)
        assert status["startTime"] and status["completionTime"]

        [pod] = await cluster.list("pods", "default", label_selector="job-name=write")
        assert pod["metadata"]["name"].startswith("write-")
        assert pod["metadata"]["labels"]["app"] == "test"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
        assert pod["status"]["phase"] == "Succeeded"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0
        assert terminated["reason"] == "Completed"
        assert terminated["message"] == "wrote out.txt"

        output = tmp_path / "volumes" / "artifacts" / "out.txt"
        assert output.read_text() == f"t0k {pod['metadata']['name']} fast"
        assert (tmp_path / "logs" / "default" / f"{pod['metadata']['name']}.log").exists()


async def test_a_failing_job_retries_then_exceeds_its_backoff_limit(tmp_path: Path) -> None:
    script = "import sys; open('/dev/stderr', 'w').write('boom'); sys.exit(3)"
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("fail", script, backoffLimit=2)])
        done = await finished(cluster, "fail")
        failed = condition(done, "Failed")
        assert failed["reason"] == "BackoffLimitExceeded"
        assert done["status"]["failed"] == 3
        assert "completionTime" not in done["status"]
        pods = await cluster.list("pods", "default", label_selector="batch.kubernetes.io/job-name=fail")
        assert len(pods) == 3
        assert {p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods} == {3}
        assert {p["status"]["phase"] for p in pods} == {"Failed"}
        log = (tmp_path / "logs" / "default" / f"{pods[0]['metadata']['name']}.log").read_text()
        assert "boom" in log


async def test_pod_failure_policy_fails_the_job_at_once(tmp_path: Path) -> None:
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("fatal", "raise SystemExit(42)", backoffLimit=5, podFailurePolicy=policy)])
        done = await finished(cluster, "fatal")
        assert condition(done, "Failed")["reason"] == "PodFailurePolicy"
        assert done["status"]["failed"] == 1


async def test_active_deadline_kills_the_pod(tmp_path: Path) -> None:
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("slow", "import time; time.sleep(30)", activeDeadlineSeconds=1)])
        done = await finished(cluster, "slow", timeout=15)
        assert condition(done, "Failed")["reason"] == "DeadlineExceeded"


async def test_suspended_jobs_do_not_run_until_resumed(tmp_path: Path) -> None:
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("queued", "pass", suspend=True)])
        suspended = await cluster.wait_for(
            lambda: condition(cluster.emulator.get("jobs", "default", "queued"), "Suspended")
        )
        assert suspended["reason"] == "JobSuspended"
        assert await cluster.list("pods", "default") == []

        await cluster.client.patch("jobs", "default", "queued", {"spec": {"suspend": False}})
        done = await finished(cluster, "queued")
        assert condition(done, "Complete")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_deleting_a_running_job_kills_its_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time, pathlib; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("doomed", script)])
        await cluster.wait_for(lambda: pid_file.exists() and pid_file.read_text())
        pid = int(pid_file.read_text())
        assert alive(pid)
        await cluster.delete("jobs", "default", "doomed")
        assert cluster.emulator.list("pods", "default") == [], "pods are garbage-collected with their Job"
        await cluster.wait_for(lambda: not alive(pid), timeout=10)


async def test_a_restarted_executor_does_not_rerun_a_finished_pod(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    )
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("once", script)])
        await finished(cluster, "once")
        # The executor stops after the pod succeeded but before the Job was marked Complete.
        await cluster.executor.stop()
        await cluster.client.patch("jobs", "default", "once", {"status": {"conditions": None}}, subresource="status")
        async with Executor(cluster.client, tmp_path, api_url=cluster.url):
            done = await finished(cluster, "once")
        assert condition(done, "Complete")
        assert len(await cluster.list("pods", "default")) == 1
    assert counter.read_text() == "x"


def waiting(cluster: DevCluster) -> dict[str, Any] | None:
    """The waiting state of a container of a pod in `default`, if one is waiting."""
    for pod in cluster.emulator.list("pods", "default"):
        for status in pod.get("status", {}).get("containerStatuses", []):
            if "waiting" in status["state"]:
                return status["state"]["waiting"]
    return None


async def test_a_missing_secret_keeps_the_pod_waiting(tmp_path: Path) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([job("waits", "import os; assert os.environ['TOKEN'] == 'ok'", env=env)])

        state = await cluster.wait_for(partial(waiting, cluster))
        assert state["reason"] == "CreateContainerConfigError"
        assert state["message"] == 'secret "later" not found'
        await cluster.apply(
            [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "later"}, "stringData": {"token": "ok"}}]
        )
        assert condition(await finished(cluster, "waits"), "Complete")


INSPECT_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys
    root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
    seen = {
        "argv": sys.argv[1:],
        "env": sorted(os.environ),
        "key": (root / "etc/creds/api-key").read_text(),
        "mode": (root / "etc/mode").read_text(),
        "scratch": (root / "scratch").is_dir(),
    }
    (root / "out" / "seen.json").write_text(json.dumps(seen))
    """
)


async def test_pods_see_their_own_environment_and_projected_volumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPERATOR_ONLY_SECRET", "leak")
    spec = job("inspect", INSPECT_SCRIPT, env=[{"name": "WHO", "value": "world"}])
    container = spec["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["hello $(WHO)", "$$(WHO)"]
    container["volumeMounts"] = [
        {"name": "out", "mountPath": "/out"},
        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
        {"name": "cfg", "mountPath": "/etc/mode", "subPath": "mode"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    spec["spec"]["template"]["spec"]["volumes"] = [
        {"name": "out", "persistentVolumeClaim": {"claimName": "results"}},
        {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "api-key"}]}},
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply(
            [
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "k"}},
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"mode": "slow"}},
                spec,
            ]
        )
        assert condition(await finished(cluster, "inspect"), "Complete")
    seen = json.loads((tmp_path / "volumes" / "results" / "seen.json").read_text())
    assert seen["argv"] == ["hello world", "$(WHO)"]
    assert (seen["key"], seen["mode"], seen["scratch"]) == ("k", "slow", True)
    assert "OPERATOR_ONLY_SECRET" not in seen["env"]
    assert {"PATH", "WHO", "HOSTNAME", "KLEINSTYLE_ROOTFS", "KLEINSTYLE_KUBE_API"} <= set(seen["env"])


async def test_a_missing_command_fails_the_pod_like_a_start_error(tmp_path: Path) -> None:
    spec = job("nocmd", "", backoffLimit=0)
    spec["spec"]["template"]["spec"]["containers"][0]["command"] = ["no-such-binary-here"]
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([spec])
        assert condition(await finished(cluster, "nocmd"), "Failed")
        [pod] = await cluster.list("pods", "default")
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["reason"] == "StartError"
        assert "executable file not found" in terminated["message"]


SUBPATH_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib
    root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
    seen = {
        "input": (root / "artifacts/team-a/lora/r1/lora.txt").read_text(),
        "team-b": (root / "artifacts/team-b/secret.txt").exists(),
        "sibling": (root / "artifacts/team-a/other/x.txt").exists(),
        "listed": sorted(p.name for p in (root / "artifacts/team-a").iterdir()),
    }
    (root / "artifacts/team-a/gen/r2/seen.json").write_text(json.dumps(seen))
    """
)


async def test_subpath_mounts_of_one_claim_show_only_their_folders(tmp_path: Path) -> None:
    """One RWX claim holding several namespaces, mounted folder by folder as the operator's Jobs do: the process
    reaches the mounted folders at their nested paths and nothing else of the claim."""
    claim = tmp_path / "volumes" / "artifacts"
    for path, text in {
        "team-a/lora/r1/lora.txt": "weights",
        "team-b/secret.txt": "b",
        "team-a/other/x.txt": "x",
    }.items():
        (claim / path).parent.mkdir(parents=True, exist_ok=True)
        (claim / path).write_text(text)
    spec = job("subpaths", SUBPATH_SCRIPT)
    pod = spec["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "artifacts", "persistentVolumeClaim": {"claimName": "artifacts"}}]
    pod["containers"][0]["volumeMounts"] = [
        {"name": "artifacts", "mountPath": "/artifacts/team-a/gen/r2", "subPath": "team-a/gen/r2"},  # created
        {"name": "artifacts", "mountPath": "/artifacts/team-a/lora/r1", "subPath": "team-a/lora/r1", "readOnly": True},
    ]
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([spec])
        assert condition(await finished(cluster, "subpaths"), "Complete")
    seen = json.loads((claim / "team-a" / "gen" / "r2" / "seen.json").read_text())
    assert seen == {"input": "weights", "team-b": False, "sibling": False, "listed": ["gen", "lora"]}


async def test_a_subpath_that_leaves_its_volume_keeps_the_pod_waiting(tmp_path: Path) -> None:
    spec = job("escape", "print('never runs')")
    pod = spec["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "artifacts", "persistentVolumeClaim": {"claimName": "artifacts"}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "artifacts", "mountPath": "/a", "subPath": "team-a/../../x"}]
    async with DevCluster(tmp_path) as cluster:
        await cluster.apply([spec])
        state = await cluster.wait_for(partial(waiting, cluster), timeout=20)
    assert state["reason"] == "CreateContainerConfigError"
    assert "must be a relative path without '..'" in state["message"]
    assert not (tmp_path / "x").exists()
