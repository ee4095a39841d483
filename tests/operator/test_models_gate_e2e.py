"""The models gate for real: kopf against the API emulator. A models-pull Job created first holds a StyleLoRA (its
board prepares meanwhile); marked complete, it wakes the StyleLoRA at once, which then creates its train Job."""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for, dev_config

from tests.operator.test_operator_e2e import BOARD, LORA, NS, phase_is

pytestmark = pytest.mark.emulator

PULL = "kleinstyle-models-pull-1a2b3c4d"
# The chart's Job, as far as the gate reads it. Suspended: the local executor would otherwise run the pull (which
# reaches for the Hub); it stands for a pull that has not finished, whatever holds it.
PULL_JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": PULL, "labels": {"app.kubernetes.io/component": "models-pull"}},
    "spec": {
        "suspend": True,
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/component": "models-pull"}},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "pull", "image": "kleinstyle", "command": ["kleinstyle", "models", "pull"]}],
            },
        },
    },
}


def models_ready(obj: dict) -> dict | None:
    return next((c for c in obj["status"].get("conditions", []) if c["type"] == "ModelsReady"), None)


async def test_a_pull_job_holds_a_lora_until_it_completes(root: Path):
    # No resync to speak of: what moves the LoRA on is the pull Job's event.
    config = dev_config(root).model_copy(update={"resync_seconds": 3600.0})
    async with cluster_for(root, NS, config=config) as cluster:
        await cluster.apply([PULL_JOB])
        await cluster.apply([BOARD, LORA])
        await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Succeeded"), timeout=60)  # not held
        lora = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-lora", "Waiting"), timeout=30)

        async def held() -> dict | None:
            obj = await cluster.get("styleloras", NS, "bd9-lora")
            found = models_ready(obj) if obj else None
            return obj if found and found["reason"] == "ModelsPulling" else None

        lora = await cluster.wait_for(held, timeout=30)
        assert models_ready(lora)["status"] == "False" and PULL in models_ready(lora)["message"]
        uid = lora["metadata"]["uid"]
        owned = f"kleinstyle.dev/owner-uid={uid}"
        assert await cluster.list("jobs", NS, label_selector=owned) == []

        # The Job controller's word: the pull completed.
        complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached"}
        await cluster.client.patch(
            "jobs", NS, PULL, {"status": {"conditions": [complete], "succeeded": 1}}, subresource="status"
        )

        async def started() -> list:
            return await cluster.list("jobs", NS, label_selector=owned)

        assert await cluster.wait_for(started, timeout=30)

        async def ready() -> dict | None:
            obj = await cluster.get("styleloras", NS, "bd9-lora")
            found = models_ready(obj) if obj else None
            return found if found and found["status"] == "True" else None

        assert (await cluster.wait_for(ready, timeout=10))["reason"] == "ModelsPulled"
