"""Valid objects (examples/ and valid/) are admitted, with the API server's structural defaults applied.

The admitted spec must also read back through the pydantic model unchanged: the CRD's defaults and the model's
defaults are one and the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.admission import admit, load_manifests
from kleinstyle.operator.api import BY_KIND, GROUP

HERE = Path(__file__).parent
REPO = HERE.parents[1]
FILES = sorted((REPO / "examples").glob("*.yaml")) + sorted((HERE / "valid").glob("*.yaml"))
OBJECTS = [
    pytest.param(obj, id=f"{path.parent.name}/{path.stem}[{index}]")
    for path in FILES
    for index, obj in enumerate(load_manifests(path.read_text(encoding="utf-8")))
    if str(obj.get("apiVersion", "")).startswith(f"{GROUP}/")
]


def _lora(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "StyleLoRA", "metadata": {"name": "x"}, "spec": spec}


def test_every_kind_has_a_valid_object() -> None:
    assert {param.values[0]["kind"] for param in OBJECTS} == set(BY_KIND)


@pytest.mark.parametrize("obj", OBJECTS)
def test_admitted_and_read_back_by_the_model(obj: dict[str, Any]) -> None:
    admitted = admit(obj)

    model = BY_KIND[obj["kind"]].spec.model_validate(admitted["spec"])
    assert model.model_dump(mode="json", exclude_none=True) == admitted["spec"]
    assert admit(admitted) == admitted  # defaulting is idempotent


def test_stylelora_with_only_a_board_gets_every_default() -> None:
    spec = admit(_lora(boardRef={"name": "bd9"}))["spec"]

    assert spec == {
        "boardRef": {"name": "bd9"},
        "variant": "auto",
        "mode": "standard",
        "earlyStopping": {"enabled": True, "patience": 2},
        "backend": "auto",
        "model": {"name": "klein-base-9b"},
        "scheduling": {"gpus": 1},
        "artifactPolicy": "Retain",
        "output": {"loraFormats": ["diffusers"]},
    }


def test_defaults_inside_given_objects_and_list_items() -> None:
    spec = admit(_lora(boardRef={"name": "bd9"}, training={}, earlyStopping={"patience": 5}))["spec"]
    assert spec["training"] == {"targetBlocks": "all"}
    assert spec["earlyStopping"] == {"enabled": True, "patience": 5}

    job = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "GenerationJob",
        "metadata": {"name": "x"},
        "spec": {"loras": [{"name": "a"}, {"name": "b", "kind": "LoRAFusion", "weight": 0.5}], "prompts": ["p"]},
    }
    loras = admit(job)["spec"]["loras"]
    assert loras == [
        {"name": "a", "kind": "StyleLoRA", "weight": 1.0},
        {"name": "b", "kind": "LoRAFusion", "weight": 0.5},
    ]


def test_nulls_are_dropped_then_defaulted() -> None:
    spec = admit(_lora(boardRef={"name": "bd9"}, variant=None, training={"rank": None}))["spec"]
    assert spec["variant"] == "auto"
    assert spec["training"] == {"targetBlocks": "all"}


def test_status_is_dropped_on_create_and_input_untouched() -> None:
    obj = _lora(boardRef={"name": "bd9"})
    obj["status"] = {"phase": "Succeeded"}

    admitted = admit(obj)

    assert "status" not in admitted
    assert obj["status"] == {"phase": "Succeeded"} and "variant" not in obj["spec"]


def test_non_strict_prunes_unknown_fields_silently() -> None:
    obj = _lora(boardRef={"name": "bd9", "kind": "StyleBoard"}, trainng={"rank": 32})
    obj["metadata"]["nmae"] = "typo"
    obj["extra"] = 1

    admitted = admit(obj, strict=False)

    assert admitted["spec"]["boardRef"] == {"name": "bd9"}
    assert "trainng" not in admitted["spec"] and "extra" not in admitted
    assert admitted["metadata"] == {"name": "x"}


def test_metadata_is_kept() -> None:
    obj = _lora(boardRef={"name": "bd9"})
    obj["metadata"].update(namespace="team-a", labels={"a": "b"}, annotations={"c": "d"})
    assert admit(obj)["metadata"] == obj["metadata"]
