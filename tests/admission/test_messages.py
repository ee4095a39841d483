"""The refusals read like the API server's, and CEL rules that cannot run here fail loudly instead of passing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kleinstyle.devcluster.admission import (
    AdmissionRejected,
    CELRuleError,
    admit,
    cel_name,
    default_crds,
    format_value,
    load_manifests,
)
from kleinstyle.operator.api import GROUP


def _obj(kind: str, spec: dict[str, Any] | None, name: str = "x") -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": f"{GROUP}/v1alpha1", "kind": kind, "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = spec
    return obj


def _refusal(obj: dict[str, Any], **kwargs: Any) -> AdmissionRejected:
    with pytest.raises(AdmissionRejected) as refused:
        admit(obj, **kwargs)
    return refused.value


def _board(**spec: Any) -> dict[str, Any]:
    return _obj("StyleBoard", {"triggerWord": "bd9style", "images": [{"source": "https://e.com/a.png"}], **spec})


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            _obj("StyleLoRA", {"boardRef": {"name": "b"}, "training": {"rank": 48}}),
            'spec.training.rank: Unsupported value: 48: supported values: "16", "32", "64", "128"',
        ),
        (
            _obj("StyleLoRA", {"boardRef": {"name": "b"}, "training": {"steps": 50}}),
            "spec.training.steps: Invalid value: 50: "
            "spec.training.steps in body should be greater than or equal to 100",
        ),
        (
            _obj("StyleLoRA", {"boardRef": {"name": "b"}, "training": {"learningRate": 0.0}}),
            "spec.training.learningRate: Invalid value: 0: spec.training.learningRate in body should be greater than 0",
        ),
        (_obj("StyleBoard", {"triggerWord": "bd9style"}), "spec.images: Required value"),
        (
            _board(images=[{"source": f"https://e.com/{i}.png"} for i in range(51)]),
            "spec.images: Too many: 51: must have at most 50 items",
        ),
        (
            _board(storageSecret="s" * 254),
            "spec.storageSecret: Too long: may not be more than 253 bytes",
        ),
        (
            _obj("StyleLoRA", {"boardRef": {"name": "b", "namespace": "other"}}),
            "spec.boardRef.namespace: Forbidden: cross-namespace references are not allowed: omit namespace "
            "(the referring object's namespace is used)",
        ),
        (
            _obj("LoRAFusion", {"sources": [{"name": "a"}, {"name": "b"}], "rank": 8, "energy": 0.5}),
            "spec.energy: Invalid value: set rank or energy, not both",
        ),
        (
            _obj("GenerationJob", {"loras": [{"name": "a"}], "prompts": ["p"], "guidance": "high"}),
            'spec.guidance: Invalid value: "string": spec.guidance in body must be of type number: "string"',
        ),
    ],
)
def test_cause_reads_like_the_api_server(obj: dict[str, Any], expected: str) -> None:
    error = _refusal(obj)
    causes = [f"{cause['field']}: {cause['message']}" for cause in error.causes]
    assert expected in causes


def test_one_cause_is_bare_and_several_are_bracketed() -> None:
    one = _refusal(_obj("StyleLoRA", {"boardRef": {"name": "b"}, "training": {"steps": 50}}, name="bd9-lora"))
    assert one.message == (
        'StyleLoRA.kleinstyle.dev "bd9-lora" is invalid: spec.training.steps: Invalid value: 50: '
        "spec.training.steps in body should be greater than or equal to 100"
    )
    two = _refusal(_obj("StyleLoRA", {"boardRef": {"name": "b"}, "training": {"steps": 50, "seed": -1}}))
    assert two.message.startswith('StyleLoRA.kleinstyle.dev "x" is invalid: [spec.training.seed: ')
    assert two.message.endswith("]") and len(two.causes) == 2


def test_cel_rules_are_skipped_after_a_blocking_error_like_the_api_server() -> None:
    error = _refusal(
        _obj("LoRAFusion", {"sources": [{"name": "a"}, {"name": "b"}], "method": "mean", "rank": 8, "energy": 0.5})
    )
    assert [cause["field"] for cause in error.causes] == ["spec.method", "<nil>"]
    assert "some validation rules were not checked because the object was invalid" in error.message


def test_a_schema_error_notes_that_rules_were_not_checked() -> None:
    # StyleBoard's images carry a rule; the API server skips rules once the schema failed, and says so.
    error = _refusal(_board(captioning={"provider": "openai"}))
    assert [cause["field"] for cause in error.causes] == ["spec.captioning.provider", "<nil>"]


def test_unknown_fields_are_refused_like_strict_field_validation() -> None:
    obj = _obj("StyleLoRA", {"boardRef": {"name": "b"}, "varient": "auto"})
    obj["metadata"]["lables"] = {}
    error = _refusal(obj)
    assert error.message == (
        'StyleLoRA in version "v1alpha1" cannot be handled as a StyleLoRA: strict decoding error: '
        'unknown field "metadata.lables", unknown field "spec.varient"'
    )
    assert (error.code, error.causes) == (400, [])  # BadRequest, the fields named in the message only (1.37)


def test_unknown_kind_and_bad_namespace() -> None:
    assert 'no matches for kind "Board"' in _refusal(_obj("Board", {})).message
    obj = _obj("StyleLoRA", {"boardRef": {"name": "b"}})
    obj["metadata"]["namespace"] = "Team_A"
    assert _refusal(obj).causes[0]["field"] == "metadata.namespace"


def test_yaml_numbers_read_like_kubectl() -> None:
    (obj,) = load_manifests("a: 1e-4\nb: 1.0e5\nc: '1e-4'\nd: 10\n---\n")
    assert obj == {"a": 1e-4, "b": 1e5, "c": "1e-4", "d": 10}


def test_value_formatting_follows_go() -> None:
    assert [format_value(v) for v in (100.0, 0.0001, -0.1, 3, "a", None, True)] == [
        "100",
        "0.0001",
        "-0.1",
        "3",
        '"a"',
        "null",
        "true",
    ]


def test_cel_names_are_escaped_like_kubernetes() -> None:
    assert cel_name("namespace") == "__namespace__"
    assert cel_name("a-b.c/d__e") == "a__dash__b__dot__c__slash__d__underscores__e"
    assert cel_name("targetBlocks") == "targetBlocks"


# --- rules that cannot run here must fail loudly ------------------------------------------------------------------


def _fusion_crds_with_rule(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    crds = copy.deepcopy(default_crds())
    crd = crds["lorafusions.kleinstyle.dev.yaml"]
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] = [rule]
    return crds


FUSION = _obj("LoRAFusion", {"sources": [{"name": "a"}, {"name": "b"}], "method": "svd"})


@pytest.mark.parametrize(
    "rule",
    [
        "self.method ==",  # syntax error
        "url(self.method).getHost() == ''",  # a Kubernetes library function cel-expr-python lacks
        "has(self.rnak)",  # not a property: the API server's typed compiler refuses it
    ],
)
def test_rule_that_does_not_compile_raises(rule: str) -> None:
    with pytest.raises(CELRuleError):
        admit(FUSION, _fusion_crds_with_rule({"rule": rule}))


def test_rule_that_cannot_be_evaluated_raises() -> None:
    with pytest.raises(CELRuleError):
        admit(FUSION, _fusion_crds_with_rule({"rule": "self.method + 1 == 2"}))
    with pytest.raises(CELRuleError):
        admit(FUSION, _fusion_crds_with_rule({"rule": "self.method"}))  # not a bool


def test_message_expression_and_transition_rules() -> None:
    crds = _fusion_crds_with_rule({"rule": "self.method != 'svd'", "messageExpression": "'no ' + self.method"})
    assert _refusal(FUSION, crds=crds).causes[0]["message"] == "Invalid value: no svd"
    crds = _fusion_crds_with_rule({"rule": "self.method == oldSelf.method"})
    assert admit(FUSION, crds)["spec"]["method"] == "svd"  # transition rules run on update only
