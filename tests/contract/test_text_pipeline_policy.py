"""The text-pipeline decision, decided once in the TrainingPlan: docs/policy.md's rows as cases."""

from __future__ import annotations

import pytest
from kleinstyle.contract.plan import plan_training, text_pipeline_for
from kleinstyle.contract.prompt_policy import LoraStyle, decide_prompt_mode


@pytest.mark.parametrize(
    ("images", "expected"),
    [(1, False), (2, False), (3, False), (4, True), (5, True), (7, True), (12, True), (31, True)],
)
def test_off_for_1_to_3_references_on_from_4(images: int, expected: bool) -> None:
    plan = plan_training(images, {"boardRef": {"name": "b"}})
    assert plan.text_pipeline.value is expected
    assert plan.text_pipeline == text_pipeline_for(plan.variant, images)


def test_a_variant_without_the_pipeline_keeps_it_off_at_any_size() -> None:
    decision = text_pipeline_for("B_r128", 12)
    assert (decision.value, decision.source) == (False, "variant")
    assert "B_r128" in decision.reason


def test_four_references_warn_and_name_the_way_out() -> None:
    plan = plan_training(4, {"boardRef": {"name": "b"}})
    assert plan.text_pipeline.value and any("textPipeline: off" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("planned", "requested", "expected"),
    [(True, "auto", True), (False, "auto", False), (False, "on", True), (True, "off", False)],
)
def test_a_generation_job_may_override_the_plan(planned: bool, requested: str, expected: bool) -> None:
    mode, _ = decide_prompt_mode(requested, [LoraStyle("StyleLoRA a", ("astyle",), planned)])
    assert (mode == "reformulate") is expected
