"""A run survives its dependency (the failure, reproduced on the embedded cluster): the board of a training LoRA is
deleted mid-run. Before, the LoRA turned Waiting while its Job trained on, its RBAC stayed, its status froze at the
last progress without a loraURI after the Job completed, and a Warning Event was posted on every reconcile. Now the
run finishes and is published, status says its board is gone, and Events come on transitions only."""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for, write_model_cache

from .test_operator_e2e import BOARD, LORA, NS, phase_is

pytestmark = pytest.mark.emulator


async def test_a_lora_whose_board_is_deleted_mid_run_finishes_and_is_published(root: Path):
    write_model_cache(root)
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD, LORA])
        running = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Running"), timeout=120)
        await cluster.delete("styleboards", NS, "bd9")
        done = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Succeeded"), timeout=180)
        status = done["status"]
        assert status["runHash"] == running["status"]["runHash"]  # the same run, not a new one
        assert status["loraURI"] == f"{status['artifactURI']}/lora.safetensors"
        source = next(c for c in status["conditions"] if c["type"] == "SourcesCurrent")
        assert (source["status"], source["reason"]) == ("False", "SourceChanged")
        assert "StyleBoard bd9 was deleted" in source["message"]

        # The run is over: its ServiceAccount, Role and RoleBinding go; its Job and RunSpec stay as its record.
        async def runner_gone():
            for kind in ("serviceaccounts", "roles", "rolebindings"):
                if any(o["metadata"]["name"].startswith("bd9-lora-train") for o in await cluster.list(kind, NS)):
                    return False
            return True

        await cluster.wait_for(runner_gone, timeout=30)
        assert [j["metadata"]["name"] for j in await cluster.list("jobs", NS)] == [status["jobName"]]
        events = [e for e in cluster.emulator.list("events", NS) if e["involvedObject"]["name"] == "bd9-lora"]
        assert [e["reason"] for e in events if e["type"] == "Warning"] == []
        assert len(events) <= 4, [e["reason"] for e in events]  # transitions (Pending, Running, Succeeded, a source)
