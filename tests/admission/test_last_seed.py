"""A spec whose last seed (seed + count - 1) passes 2^32 - 1 is refused at apply time and, had it got through an
older CRD, by the operator's own reading of the spec, naming both fields and the bound."""

from __future__ import annotations

import pytest
from kleinstyle.devcluster.admission import AdmissionRejected, admit
from kleinstyle.operator.api import GROUP
from kleinstyle.operator.api.common import field_errors
from kleinstyle.operator.api.generationjob import GenerationJobSpec
from pydantic import ValidationError

RULE = "spec.seed + spec.count - 1 must be at most 4294967295"


def _spec(seed: int, count: int) -> dict:
    return {"loras": [{"name": "a"}], "prompts": ["p"], "seed": seed, "count": count}


def test_apply_refuses_seeds_past_the_bound() -> None:
    obj = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "GenerationJob", "metadata": {"name": "x"}}

    with pytest.raises(AdmissionRejected) as refused:
        admit(obj | {"spec": _spec(2**32 - 2, 3)})

    assert [cause["field"] for cause in refused.value.causes] == ["spec.seed"]
    assert RULE in refused.value.message


@pytest.mark.parametrize(("seed", "count"), [(2**32 - 3, 3), (2**32 - 16, 16), (2**32 - 1, 1)])
def test_seeds_up_to_the_bound_are_accepted(seed: int, count: int) -> None:
    spec = GenerationJobSpec.model_validate(_spec(seed, count))

    assert spec.seed + spec.count - 1 <= 2**32 - 1


@pytest.mark.parametrize(("seed", "count"), [(2**32 - 2, 3), (2**32 - 15, 16)])
def test_operator_refuses_what_an_older_crd_let_through(seed: int, count: int) -> None:
    with pytest.raises(ValidationError) as refused:
        GenerationJobSpec.model_validate(_spec(seed, count))

    (line,) = field_errors(refused.value)
    assert RULE in line
