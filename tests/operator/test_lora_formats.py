"""spec.output.loraFormats: carried into the TrainSpec (a new run when it changes, none for specs without it), every
published file in status once the run succeeds, and unknown or repeated formats refused by the schema."""

from __future__ import annotations

import json

import pytest
from kleinstyle.contract.reports import TrainReport
from kleinstyle.operator.api.stylelora import StyleLoRASpec
from kleinstyle.operator.crdgen import build_crds
from pydantic import ValidationError

from tests.operator.test_reconcile import _job, lora, ready_board, report, step, with_status

DEPS = {("StyleBoard", "bd9"): ready_board()}


def runspec_of(decision) -> dict:
    return json.loads(next(c for c in decision.create if c["kind"] == "ConfigMap")["data"]["runspec.json"])


def test_the_formats_reach_the_trainspec_and_a_spec_without_them_keeps_its_runspec():
    default = step(lora(), deps=DEPS)
    assert "lora_formats" not in runspec_of(default)["work"]  # the RunSpec (and its hash) of older specs unchanged
    explicit = step(lora(output={"loraFormats": ["diffusers"]}), deps=DEPS)
    assert explicit.status["runHash"] == default.status["runHash"]

    both = step(lora(output={"loraFormats": ["bfl", "diffusers"]}), deps=DEPS)
    assert runspec_of(both)["work"]["lora_formats"] == ["bfl", "diffusers"]
    assert both.status["runHash"] != default.status["runHash"]


def test_a_succeeded_run_lists_every_published_file():
    first = step(lora(output={"loraFormats": ["diffusers", "bfl"]}), deps=DEPS)
    body = with_status(lora(output={"loraFormats": ["diffusers", "bfl"]}), first)
    result = {"lora_step": 30, "steps": 30, "total_steps": 30, "checkpoints": []}
    body["status"]["progress"] = report(first, TrainReport, state="Succeeded", result=result)
    done = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    status = step(body, children=[*first.create[:-1], done], deps=DEPS).status
    folder = first.status["artifactURI"]
    assert status["phase"] == "Succeeded" and status["loraURI"] == f"{folder}/lora.safetensors"
    assert status["loraFiles"] == [
        {"format": "diffusers", "uri": f"{folder}/lora.safetensors"},
        {"format": "bfl", "uri": f"{folder}/lora.bfl.safetensors"},
    ]


@pytest.mark.parametrize("formats", [[], ["comfyui"], ["bfl", "bfl"], ["diffusers", "bfl", "diffusers"]])
def test_unknown_empty_or_repeated_formats_are_refused(formats):
    with pytest.raises(ValidationError):
        StyleLoRASpec.model_validate({"boardRef": {"name": "bd9"}, "output": {"loraFormats": formats}})


def test_the_crd_schema_says_the_same():
    (crd,) = [c for c in build_crds().values() if c["spec"]["names"]["kind"] == "StyleLoRA"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["output"]
    formats = schema["properties"]["loraFormats"]
    assert formats["items"]["enum"] == ["diffusers", "bfl"]
    assert (formats["minItems"], formats["maxItems"], formats["x-kubernetes-list-type"]) == (1, 2, "set")
    assert formats["default"] == ["diffusers"]
