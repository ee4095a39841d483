"""What a pod reports (kleinstyle.contract.reports): each step's report, filled in, reads back with `read_report` as
the same model from the JSON it travels as; the envelope picks the model by `step`; the wire names stay as they are;
a newer pod's extra fields are ignored and a malformed report is refused. That a report survives the merge patch
dropping its nulls is tested in tests/runtime/test_report.py."""

from __future__ import annotations

import json

import pytest
from kleinstyle.contract.reports import (
    REPORTS,
    AcceptedImage,
    CheckpointReport,
    Duplicate,
    EvaluationReport,
    FusedSource,
    FuseReport,
    FuseResult,
    GenerateProgress,
    GenerateReport,
    GenerateResult,
    ImageTiming,
    PrepareReport,
    PrepareResult,
    ProbeScoresReport,
    Rejection,
    TokenUsage,
    TrainProgress,
    TrainReport,
    TrainResult,
    read_report,
)
from kleinstyle.contract.style_profile import StyleProfile
from pydantic import ValidationError

from tests.support.profiles import PROFILE as PROFILE_DATA

PROFILE = StyleProfile.model_validate(PROFILE_DATA)
SCORES = ProbeScoresReport(step=0, style=[0.4, 0.5], adherence=[0.9, 0.8], leakage=[0.1, 0.2])
EVALUATION = EvaluationReport(
    baseline=SCORES,
    checkpoints=[
        ProbeScoresReport(step=250, style=[0.6, None], adherence=[0.9, 0.9], leakage=[0.2, 0.2], validation_loss=0.31)
    ],
)
CHECKPOINT = CheckpointReport(step=250, uri="pvc://artifacts/x/work/checkpoints/step_000250", loss=0.12)

REPORTED = [
    PrepareReport(
        run_hash="0123456789",
        state="Succeeded",
        message="2 of 3 images accepted",
        result=PrepareResult(
            succeeded=True,
            message="2 of 3 images accepted",
            accepted=[
                AcceptedImage(
                    source="https://x.test/1.png",
                    file="001.png",
                    width=1024,
                    height=768,
                    sha256="a" * 64,
                    caption="bd9style, a fox",
                    caption_origin="generated",
                    style_words=["watercolor"],
                ),
                AcceptedImage(
                    source="pvc://refs/2.png",
                    file="002.png",
                    width=512,
                    height=512,
                    sha256="b" * 64,
                    caption="bd9style, a hen",
                ),
            ],
            rejected=[Rejection(source="https://x.test/3.png", reason="HTTP 503", retryable=True)],
            duplicates=[
                Duplicate(
                    kind="near",
                    source="pvc://refs/2.png",
                    resembles="https://x.test/1.png",
                    resembles_file="001.png",
                    file="002.png",
                    distance=4,
                )
            ],
            warnings=["one image was small"],
            dataset_uri="/artifacts/team-a/styleboard/b/uid-1/0123456789/dataset",
            dataset_display_uri="pvc://artifacts/team-a/styleboard/b/uid-1/0123456789/dataset",
            captioning="gemini: 1 generated, 1 given",
            style_profile=PROFILE,
            style_profile_images=["001.png", "002.png"],
            token_usage=TokenUsage(
                provider="gemini",
                model="gemini-2.5-pro",
                calls=3,
                cached_calls=1,
                prompt_tokens=300,
                output_tokens=60,
                total_tokens=360,
                by_purpose={"caption": 240},
            ),
        ),
    ),
    TrainReport(
        run_hash="0123456789",
        state="Running",
        progress=TrainProgress(
            step=300,
            total_steps=1000,
            loss=0.1,
            lr=1e-4,
            seconds_per_step=0.8,
            eta_seconds=560.0,
            checkpoints=[CHECKPOINT],
            evaluation=EVALUATION,
            stage="style",
        ),
    ),
    TrainReport(
        run_hash="0123456789",
        state="Succeeded",
        result=TrainResult(
            lora_file="lora.safetensors",
            steps=750,
            lora_step=250,
            total_steps=1000,
            final_loss=0.09,
            checkpoints=[CHECKPOINT],
            stopped_early=True,
            stop_reason="style plateaued",
            best_checkpoint=250,
            warnings=["w"],
            evaluation=EVALUATION,
        ),
    ),
    GenerateReport(
        run_hash="0123456789",
        state="Succeeded",
        progress=GenerateProgress(images_done=2, images_total=2),
        result=GenerateResult(
            images=[ImageTiming(index=1, seconds=3.5), ImageTiming(index=2, reused=True)],
            prompts_used=["bd9style, a fox"],
            reformulated=[False],
            warnings=["capped"],
            seconds_total=3.5,
        ),
    ),
    FuseReport(
        run_hash="0123456789",
        state="Failed",
        message="no room",
        result=FuseResult(
            method="klora",
            selection="soft",
            rank=16,
            energy_kept=0.97,
            energy_kept_per_layer={"min": 0.9, "median": 0.97, "max": 1.0},
            layers=3,
            base="klein-base-9b",
            duration_seconds=1.5,
            sources=[FusedSource(uri="/artifacts/x/lora.safetensors", weight=0.5, format="kleinstyle", rank=32)],
            warnings=["w"],
            lora_file="lora.safetensors",
        ),
    ),
]


@pytest.mark.parametrize("report", REPORTED, ids=lambda r: f"{r.step}-{r.state}")
def test_each_steps_report_reads_back_from_its_json(report: object) -> None:
    wire = json.loads(report.model_dump_json())  # type: ignore[attr-defined]
    read = read_report(wire)
    assert type(read) is REPORTS[wire["step"]]
    assert read == report


def test_the_wire_names_stay_as_released() -> None:
    """Progress in camelCase, results in snake_case, since v0.1: a pod of the previous release still reports."""
    train = json.loads(REPORTED[1].model_dump_json())
    assert {"runHash", "state", "step", "progress"} <= set(train)
    assert {"totalSteps", "secondsPerStep", "etaSeconds"} <= set(train["progress"])
    assert {"imagesDone", "imagesTotal"} == set(json.loads(REPORTED[3].model_dump_json())["progress"])
    assert {"lora_step", "total_steps", "stopped_early"} <= set(json.loads(REPORTED[2].model_dump_json())["result"])
    assert set(json.loads(REPORTED[0].model_dump_json())["result"]["style_profile"]) >= {"MUST_APPLY", "ENRICH"}


def test_a_newer_pods_extra_fields_are_ignored() -> None:
    sent = {
        "step": "generate",
        "runHash": "0123456789",
        "state": "Running",
        "since": "v9",
        "progress": {"imagesDone": 1, "imagesTotal": 4, "gpu": "H200"},
    }
    read = read_report(sent)
    assert read == GenerateReport(
        run_hash="0123456789", state="Running", progress=GenerateProgress(images_done=1, images_total=4)
    )


@pytest.mark.parametrize(
    "sent",
    [
        {"step": "evaluate", "runHash": "r", "state": "Running"},  # no such step
        {"runHash": "r", "state": "Running"},  # no step
        {"step": "train", "state": "Running"},  # no run
        {"step": "train", "runHash": "r", "state": "Paused"},
        {"step": "train", "runHash": "r", "state": "Running", "progress": {"step": "many"}},
        {"step": "fuse", "runHash": "r", "state": "Succeeded", "result": {"method": "svd"}},  # a half result
        ["train"],
    ],
)
def test_a_malformed_report_is_refused(sent: object) -> None:
    with pytest.raises(ValidationError):
        read_report(sent)
    assert issubclass(ValidationError, ValueError)  # what the operator catches to turn it into a Warning


def test_every_step_has_its_report_model() -> None:
    assert set(REPORTS) == {"prepare", "train", "generate", "fuse"}
    assert all(model.model_fields["step"].default == step for step, model in REPORTS.items())
