"""The RunSpec hash of an unchanged resource never changes with a refactor: it names the run's Job and artifact
folder, so a new hash re-runs every resource once after an operator upgrade. These values were recorded before the
contract package was split out of the operator; a change here must be deliberate and said in the README. The StyleLoRA
ones changed once since, on purpose: the plan holds references out for a validation loss, its rank
reason records the shared q/k/v LoRA, and the evaluation names its style and text models, because what the
builtin trainer computes changed (no upscaling, Kaiming init, one LoRA per fused qkv).

Inputs are located from each dependency's uid and run since (status is output, never input), as the operator
always wrote them into status: only the fusion's golden changed, because its fixture gave the LoRA `ink` the file
of `bd9-lora` (`loraURI` copied), which no real status could say."""

from __future__ import annotations

import hashlib
import json

import pytest
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.reconcile import reconcile

from tests.support.profiles import PROFILE
from tests.support.records import observed

CFG = OperatorConfig()
NS = "team-a"


def _obj(kind: str, name: str, spec: dict, status: dict | None = None, uid: str | None = None) -> dict:
    body = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "uid": uid or f"uid-{name}", "generation": 1},
        "spec": spec,
    }
    if status is not None:
        body["status"] = {"phase": "Succeeded", "observedGeneration": 1, **status}
    return body


BOARD_SPEC = {
    "triggerWord": "bd9style",
    "images": [{"source": "pvc://refs/bd9/01.png", "caption": "a sun"}, {"source": "https://x.test/2.png"}],
    "captioning": {"provider": "gemini", "apiKeySecret": {"name": "gemini", "key": "GEMINI_API_KEY"}},
}
BOARD = _obj(
    "StyleBoard",
    "bd9",
    BOARD_SPEC,
    {
        "runHash": "abc",
        "datasetURI": "pvc://kleinstyle-artifacts/team-a/styleboard/bd9/uid-bd9/abc/dataset",
        "imagesAccepted": 12,
        "styleProfile": PROFILE,
    },
)
LORA_STATUS = {
    "runHash": "abc",
    "loraURI": "pvc://kleinstyle-artifacts/team-a/stylelora/bd9-lora/uid/abc/lora.safetensors",
    "triggerWord": "bd9style",
    "plan": {"textPipeline": True, "variantReason": "12 references: GEM+A"},
    "styleProfile": PROFILE,
}
# Where a LoRA is follows from its uid and run (status.runHash), as its status.loraURI says.
LORA = _obj("StyleLoRA", "bd9-lora", {"boardRef": {"name": "bd9"}}, LORA_STATUS, uid="uid")
INK = _obj("StyleLoRA", "ink", {"boardRef": {"name": "bd9"}}, {**LORA_STATUS, "triggerWord": "inkstyle"})
FUSION = _obj(
    "LoRAFusion",
    "mix",
    {"sources": [{"name": "bd9-lora"}, {"name": "ink", "weight": 0.5}], "method": "svd"},
    {"runHash": "abc", "loraURI": "pvc://kleinstyle-artifacts/team-a/lorafusion/mix/uid/abc/lora.safetensors"},
    uid="uid",
)
DEPS = {
    ("StyleBoard", "bd9"): BOARD,
    ("StyleLoRA", "bd9-lora"): LORA,
    ("StyleLoRA", "ink"): INK,
    ("LoRAFusion", "mix"): FUSION,
}

CASES = {
    "board": (_obj("StyleBoard", "bd9", BOARD_SPEC), "58bc13dc56"),
    "lora-builtin": (_obj("StyleLoRA", "bd9-lora", {"boardRef": {"name": "bd9"}, "backend": "builtin"}), "1eb58da51d"),
    "lora-aitoolkit": (_obj("StyleLoRA", "bd9-lora", {"boardRef": {"name": "bd9"}}), "bc574f5229"),
    "lora-two-step": (
        _obj(
            "StyleLoRA",
            "bd9-lora",
            {"boardRef": {"name": "bd9"}, "backend": "builtin", "mode": "two-step", "training": {"rank": 32}},
        ),
        "2e64ec7d09",
    ),
    "generation": (
        _obj(
            "GenerationJob",
            "samples",
            {
                "loras": [{"name": "bd9-lora", "weight": 0.8}, {"kind": "LoRAFusion", "name": "mix"}],
                "prompts": ["a fox", "a red house"],
                "count": 2,
                "reformulation": {"apiKeySecret": {"name": "gemini", "key": "GEMINI_API_KEY"}},
            },
        ),
        "ff9b76cb51",
    ),
    "fusion": (
        _obj("LoRAFusion", "mix", {"sources": [{"name": "bd9-lora"}, {"name": "ink", "weight": 0.5}], "method": "svd"}),
        "f202957753",
    ),
}

CONFIGMAPS = {
    "board": "0246c7454b307e6e",
    "fusion": "b078f90093c3bf6e",
    "generation": "f94329feefdf0413",
    "lora-aitoolkit": "8ea6360a3329f235",
    "lora-builtin": "8bc89ecb9872c2cf",
    "lora-two-step": "929589f7326e3e94",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_runspec_hash_of_an_unchanged_resource_stays_the_same(case):
    body, golden = CASES[case]
    decision = reconcile(observed(body=body, dependencies=DEPS), CFG, "2026-12-06T00:00:00Z")
    assert decision.status["phase"] == "Pending", decision.status["message"]
    assert decision.status["runHash"] == golden
    configmap = next(c for c in decision.create if c["kind"] == "ConfigMap")
    content = hashlib.sha256(json.dumps(configmap["data"], sort_keys=True).encode()).hexdigest()[:16]
    assert content == CONFIGMAPS[case]  # what the pod reads, byte for byte: the RunSpec and the files beside it
