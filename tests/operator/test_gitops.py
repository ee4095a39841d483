"""GitOps tools read the operator's status right: the Argo CD health check (Lua, run with lupa) on real objects from
the embedded cluster, in every health it can report."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.demo import REFERENCE_CLAIM, cluster_for
from kleinstyle.devcluster.references import write_references
from lupa import LuaRuntime

from .test_operator_e2e import BOARD, NS

pytestmark = pytest.mark.emulator

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "charts/kleinstyle/files/argocd-health.lua"


def lora(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleLoRA",
        "metadata": {"name": name},
        "spec": {"boardRef": {"name": "bd9"}, **spec},
    }


GENERATION = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "GenerationJob",
    "metadata": {"name": "samples"},
    "spec": {"loras": [{"name": "no-model"}], "prompts": ["a fox"]},
}


def stalled(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Stalled" and c["status"] == "True" for c in conditions)


def argo_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as Argo CD's Lua VM computes them from `obj`."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{HEALTH_LUA.read_text()}\nend")
    health = check(lua.table_from(copy.deepcopy(obj), recursive=True))
    return health["status"], health["message"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_references(tmp_path / "volumes" / REFERENCE_CLAIM / "bd9")
    return tmp_path


async def test_the_argo_cd_health_check_on_real_objects(root: Path) -> None:
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD, lora("no-model"), lora("queued", scheduling={"queueName": "gpu"}), GENERATION])
        seen: dict[tuple[str, str], dict[str, Any]] = {}

        def phase_of(obj: dict[str, Any]) -> str:
            status = obj.get("status") or {}
            current = status.get("observedGeneration") == obj["metadata"].get("generation")
            return f"{status.get('phase')}" if current else "unobserved"

        # The GenerationJob waits on a LoRA that fails: first Waiting (Progressing), then stalled (Degraded).
        wanted = {("bd9", "Running"), ("bd9", "Succeeded"), ("no-model", "Failed"), ("queued", "Pending")}
        wanted |= {("samples", "Waiting"), ("samples", "Stalled")}
        deadline = asyncio.get_running_loop().time() + 90
        while not wanted <= seen.keys():
            for plural in ("styleboards", "styleloras", "generationjobs"):
                for obj in cluster.emulator.list(plural, NS):
                    name, phase = obj["metadata"]["name"], phase_of(obj)
                    seen.setdefault((name, "Stalled" if phase == "Waiting" and stalled(obj) else phase), obj)
            if asyncio.get_running_loop().time() > deadline:
                states = {k: (v.get("status") or {}).get("message") for k, v in seen.items()}
                raise TimeoutError(f"not seen: {sorted(wanted - seen.keys())}; seen: {states}")
            await asyncio.sleep(0.05)

    assert argo_health(seen[("bd9", "Running")])[0] == "Progressing"
    assert argo_health(seen[("bd9", "Succeeded")]) == ("Healthy", seen[("bd9", "Succeeded")]["status"]["message"])
    assert argo_health(seen[("no-model", "Failed")])[0] == "Degraded"
    queued = seen[("queued", "Pending")]
    assert next(c for c in queued["status"]["conditions"] if c["type"] == "Ready")["reason"] == "Queued"
    assert argo_health(queued)[0] == "Suspended"  # Kueue holds its Job
    assert argo_health(seen[("samples", "Waiting")])[0] == "Progressing"  # its LoRA is still on its way
    assert argo_health(seen[("samples", "Stalled")])[0] == "Degraded"  # its LoRA failed: nothing changes by itself
    unobserved = {
        **seen[("bd9", "Succeeded")],
        "metadata": {**seen[("bd9", "Succeeded")]["metadata"], "generation": 99},
    }
    assert argo_health(unobserved) == ("Progressing", "the operator has not seen this spec yet")
    assert argo_health({"metadata": {"generation": 1}}) == ("Progressing", "waiting for the operator")
