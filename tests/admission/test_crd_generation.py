"""crds/ is what the models generate, and what they generate is a structural, self-documenting CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kleinstyle.devcluster.admission import Resource
from kleinstyle.operator.api import KINDS
from kleinstyle.operator.crdgen import (
    HEADER,
    CRDGenerationError,
    build_crds,
    openapi_schema,
    render_yaml,
    stale_crds,
    structural_errors,
    undocumented,
    write_crds,
)
from pydantic import BaseModel, Field

REPO = Path(__file__).parents[2]
CRDS = build_crds()


def _schema(plural: str) -> dict[str, Any]:
    return CRDS[f"{plural}.kleinstyle.dev.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_directory_is_not_stale() -> None:
    assert stale_crds(REPO / "crds") == [], "crds/ is stale: run `make crds`"


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_is_structural_documented_and_its_rules_compile(name: str) -> None:
    crd = CRDS[name]
    assert structural_errors(crd) == []
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert undocumented(root["properties"]["spec"], "spec") == []
    assert undocumented(root["properties"]["status"], "status") == []
    Resource("kleinstyle.dev", "v1alpha1", crd["spec"]["names"]["kind"], root)  # raises CELRuleError otherwise


def test_names_scope_and_columns() -> None:
    crd = CRDS["styleloras.kleinstyle.dev.yaml"]
    assert crd["metadata"]["name"] == "styleloras.kleinstyle.dev"
    assert crd["spec"]["names"] == {
        "kind": "StyleLoRA",
        "listKind": "StyleLoRAList",
        "plural": "styleloras",
        "singular": "stylelora",
        "shortNames": ["sl"],
        "categories": ["kleinstyle"],
    }
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert columns["Loss"] == {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.loss",
        "description": "Latest training loss",
    }
    assert columns["LoRA"]["priority"] == 1 and "priority" not in columns["Phase"]
    assert len(CRDS) == len(KINDS)


def test_conversions_from_pydantic() -> None:
    training = _schema("styleloras")["properties"]["spec"]["properties"]["training"]
    assert training["properties"]["learningRate"]["minimum"] == 0
    assert training["properties"]["learningRate"]["exclusiveMinimum"] is True
    assert training["properties"]["rank"]["enum"] == [16, 32, 64, 128]
    assert training["properties"]["resolution"]["multipleOf"] == 64
    spec = _schema("styleloras")["properties"]["spec"]
    assert spec["properties"]["earlyStopping"]["default"] == {}
    assert spec["required"] == ["boardRef"]
    status = _schema("styleloras")["properties"]["status"]
    assert status["properties"]["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["properties"]["progress"] == {  # what a pod reports: free-form, read by the contract's models
        "description": status["properties"]["progress"]["description"],
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    plan = status["properties"]["plan"]  # the plan's summary: typed, in wire names
    assert (
        plan["properties"]["textPipeline"]["type"] == "boolean" and "x-kubernetes-preserve-unknown-fields" not in plan
    )
    assert "default" not in status["properties"]["conditions"]
    assert _schema("styleloras")["required"] == ["spec"]


def test_rendered_yaml_is_plain_and_deterministic() -> None:
    for crd in CRDS.values():
        text = render_yaml(crd)
        assert text.startswith(HEADER) and text == render_yaml(build_crds()[f"{crd['metadata']['name']}.yaml"])
        for word in ("$ref", "anyOf", "title:", "additionalProperties", "default: null", "&id", "*id"):
            assert word not in text
        assert yaml.safe_load(text) == crd


def test_stale_crds_sees_missing_changed_and_extra_files(tmp_path: Path) -> None:
    write_crds(tmp_path)
    assert stale_crds(tmp_path) == []
    (tmp_path / "styleboards.kleinstyle.dev.yaml").unlink()
    (tmp_path / "lorafusions.kleinstyle.dev.yaml").write_text("# edited\n")
    (tmp_path / "oldkinds.kleinstyle.dev.yaml").write_text("")
    assert sorted(stale_crds(tmp_path)) == [
        "lorafusions.kleinstyle.dev.yaml (differs)",
        "oldkinds.kleinstyle.dev.yaml (extra)",
        "styleboards.kleinstyle.dev.yaml (missing)",
    ]
    write_crds(tmp_path)
    assert stale_crds(tmp_path) == []


class _Undocumented(BaseModel):
    documented: int = Field(default=1, description="Has one.")
    bare: str = "x"


class _Union(BaseModel):
    value: int | str = Field(default=1, description="Two types: no structural schema.")


def test_generator_fails_loudly_on_a_field_without_description() -> None:
    with pytest.raises(CRDGenerationError, match=r"spec\.bare: no description"):
        openapi_schema(_Undocumented, "spec")


def test_generator_fails_loudly_on_a_union() -> None:
    with pytest.raises(CRDGenerationError, match=r"spec\.value: a union"):
        openapi_schema(_Union, "spec")


def test_structural_check_catches_what_the_api_server_refuses() -> None:
    crd = build_crds()["lorafusions.kleinstyle.dev.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["method"].pop("type")
    spec["properties"]["rank"]["default"] = "high"
    spec["x-kubernetes-validations"][0]["fieldPath"] = ".nope"
    spec["properties"]["scheduling"]["additionalProperties"] = {"type": "string"}
    errors = "\n".join(structural_errors(crd))
    for expected in ("spec.method: type is missing", "spec.rank: default", "'.nope'", "spec.scheduling: additional"):
        assert expected in errors
