"""A tenant forges status with kubectl (the attack, end to end; docs/threat-model.md): a StyleLoRA whose board does not
exist, its status patched to Succeeded with a run id and a loraURI pointing at another namespace's LoRA or at an
internal address. Before, a GenerationJob on it rendered with that file, and the generate pod sent a GET to the
address. Now nothing runs on it, no request leaves, and the operator writes the phantom's real status back."""

from __future__ import annotations

import asyncio
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for

from tests.support.kubectl_scenario import KUBECTL, NO_KUBECTL, Kubectl, manifest

from .test_operator_e2e import NS

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(KUBECTL is None, reason=NO_KUBECTL)]

PHANTOM = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleLoRA",
    "metadata": {"name": "phantom"},
    "spec": {"boardRef": {"name": "no-such-board"}},
}
SAMPLES = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "GenerationJob",
    "metadata": {"name": "samples"},
    "spec": {"loras": [{"name": "phantom"}], "prompts": ["a fox"], "textPipeline": "off"},
}


async def until(check, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := await check()) is None:
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)
    return found


async def test_a_forged_succeeded_status_runs_nothing_and_reaches_no_address(root: Path, loopback):
    requests: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"internal secret")

        def log_message(self, format: str, *args: object) -> None:
            pass

    port = loopback(Recorder).server_address[1]
    async with cluster_for(root, NS) as cluster:
        kubectl = Kubectl(cluster.kubeconfig_path, root / "kube-cache")

        async def status(kind: str, name: str) -> dict:
            return json.loads((await kubectl("get", kind, name, "-o", "json")).stdout).get("status") or {}

        async def phase_of(kind: str, name: str, *phases: str):
            current = await status(kind, name)
            return current if current.get("phase") in phases else None

        await kubectl("apply", "-f", "-", stdin=manifest(PHANTOM))
        await until(lambda: phase_of("sl", "phantom", "Waiting"))
        for lora_uri in (
            "pvc://kleinstyle-artifacts/team-z/stylelora/theirs/uid-z/0123456789/lora.safetensors",
            f"http://127.0.0.1:{port}/secret",
        ):
            forged = {"phase": "Succeeded", "observedGeneration": 1, "runHash": "0123456789", "loraURI": lora_uri}
            await kubectl(
                "patch", "sl", "phantom", "--subresource=status", "--type=merge", "-p", json.dumps({"status": forged})
            )
            await kubectl("apply", "-f", "-", stdin=manifest(SAMPLES))
            waiting = await until(lambda: phase_of("gj", "samples", "Waiting"))
            ready = next(c for c in waiting["conditions"] if c["type"] == "DependenciesReady")
            # Seen Succeeded (no Job of ours completed it) or already rewritten by the operator: never run on.
            assert ready["reason"] in ("StyleLoRAUnrecorded", "StyleLoRANotReady"), ready
            # The operator writes the phantom's own status back: it waits for its board.
            back = await until(lambda: phase_of("sl", "phantom", "Waiting"))
            assert next(c for c in back["conditions"] if c["type"] == "Ready")["reason"] == "StyleBoardNotFound"
            await asyncio.sleep(1.0)  # time enough for a wrongly started Job to appear
            jobs = (await kubectl("get", "jobs", "-o", "name")).stdout
            assert "samples" not in jobs and "phantom" not in jobs
            assert (await status("gj", "samples")).get("phase") == "Waiting"
        assert requests == []
