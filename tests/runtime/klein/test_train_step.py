"""`kleinstyle train` on the tiny klein in a pod filesystem: the plan mapped to the builtin trainer, progress reports
to a recording API stand-in, a stop annotation that promotes a checkpoint, bad input that exits 2 and a full volume
that exits 3."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kleinstyle.contract.early_stop import ProbeScores, StoppingSettings, decide_reported
from kleinstyle.contract.plan import TrainingPlan, plan_training
from kleinstyle.contract.pod import EXIT_VOLUME_FULL, STOP_ANNOTATION
from kleinstyle.contract.reports import EvaluationReport
from kleinstyle.contract.runspec import EvaluationSpec, Owner, RunSpec, TrainSpec
from kleinstyle.runtime import step, train
from kleinstyle.runtime.errors import BadInput
from kleinstyle.runtime.klein import lora_train
from kleinstyle.runtime.klein.evaluate import Evaluator
from kleinstyle.runtime.klein.tiny_evaluators import CONTENT_DIR, STYLE_DIR, TEXT_DIR
from kleinstyle.runtime.train.settings import diffusers_prefix, train_settings
from PIL import Image
from safetensors.torch import load_file

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

OWNER = Owner(kind="StyleLoRA", plural="styleloras", namespace="team-a", name="wc-lora", uid="uid-2")
OWNER_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/styleloras/wc-lora"
OUTPUT = "/artifacts/team-a/stylelora/wc-lora/uid-2/abc"
DATASET = "/artifacts/team-a/styleboard/wc/uid-1/0123456789/dataset"  # the board's, in the same namespace
DISPLAY = "pvc://kleinstyle-artifacts/team-a/stylelora/wc-lora/uid-2/abc"
SPEC_PATH = "/etc/kleinstyle/runspec.json"
QUICK = {
    "rank": 16,
    "steps": 6,
    "checkpointEvery": 2,
    "resolution": 64,
    "optimizer": "adamw",
    "learningRate": 1e-2,
    "captionDropout": 0.0,
}


# --- pure mapping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "prefix"),
    [
        ("double_blocks.0", "transformer_blocks.0."),
        ("double_blocks.7", "transformer_blocks.7."),
        ("single_blocks.1", "single_transformer_blocks.1."),
        ("single_blocks.23", "single_transformer_blocks.23."),
    ],
)
def test_bfl_block_names_map_to_diffusers_prefixes(block: str, prefix: str) -> None:
    assert diffusers_prefix(block) == prefix


@pytest.mark.parametrize("block", ["blocks.1", "single_blocks", "single_blocks.x", "transformer_blocks.1"])
def test_unknown_block_names_are_bad_input(block: str) -> None:
    with pytest.raises(BadInput):
        diffusers_prefix(block)


def test_plan_maps_to_train_settings() -> None:
    plan = plan_training(12, {"training": {"alpha": 16, "seed": 7}})
    cfg = train_settings(plan)
    v = plan.values()
    assert (cfg.rank, cfg.alpha, cfg.optimizer, cfg.steps) == (32, 16.0, "adafactor", v["steps"])
    assert (cfg.learning_rate, cfg.weight_decay, cfg.scheduler) == (1e-4, 1e-4, "cosine")
    assert (cfg.caption_dropout, cfg.resolution, cfg.checkpoint_every, cfg.seed) == (
        0.05,
        1024,
        v["checkpoint_every"],
        7,
    )
    assert cfg.target == "all"  # a name, so it fits every klein size
    assert cfg.compile_blocks  # on CUDA; the CPU runs in these tests ignore it
    assert cfg.shared_qkv  # one LoRA per fused q/k/v, as ai-toolkit
    # The cosine midpoint the document says to check is a checkpoint even off the checkpoint_every grid.
    midpoint = plan_training(5, {"training": {"steps": 900, "checkpointEvery": 200}})
    midcfg = train_settings(midpoint)
    assert 450 in midpoint.checkpoint_steps and midcfg.is_checkpoint(450) and not midcfg.is_checkpoint(500)

    custom = plan_training(
        12, {"training": {"targetBlocks": "custom", "blocks": ["single_blocks.1", "double_blocks.3"]}}
    )
    assert train_settings(custom).target == ("single_transformer_blocks.1.", "transformer_blocks.3.")
    assert train_settings(plan_training(12, {"training": {"targetBlocks": "single"}})).target == "single"


# --- the step on the tiny model ----------------------------------------------------------------------------------


def runspec(
    rootfs: Path,
    tiny_klein: Path,
    dataset: Path,
    *,
    evaluation: EvaluationSpec | None = None,
    stopping: dict[str, Any] | None = None,
    **training: Any,
) -> str:
    models = rootfs / "models"
    models.mkdir(exist_ok=True)
    if not (models / "tiny").exists():
        (models / "tiny").symlink_to(tiny_klein, target_is_directory=True)
    data = rootfs / DATASET.lstrip("/")
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.symlink_to(dataset, target_is_directory=True)
    spec = {"backend": "builtin", "training": {**QUICK, **training}, "earlyStopping": stopping or {}}
    return write_spec(rootfs, plan_training(2, spec), "builtin", "/models/tiny", evaluation)


def write_spec(
    rootfs: Path, plan: TrainingPlan, backend: str, model_path: str, evaluation: EvaluationSpec | None = None
) -> str:
    """A train RunSpec at SPEC_PATH under the rootfs (with a /dev for the termination log); returns SPEC_PATH."""
    spec = RunSpec(
        owner=OWNER,
        output_uri=OUTPUT,
        output_display_uri=DISPLAY,
        work=TrainSpec(
            dataset_uri=DATASET,
            trigger_word="tokstyle",
            image_count=plan.images,
            backend=backend,
            model_path=model_path,
            plan=plan,
            evaluation=evaluation,
        ),
    )
    path = rootfs / SPEC_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    (rootfs / "dev").mkdir(exist_ok=True)
    return SPEC_PATH


def run_id_of(rootfs: Path, spec_path: str) -> str:
    return RunSpec.from_json((rootfs / spec_path.lstrip("/")).read_text()).run_id()


def serve_owner(
    kube_api: KubeApi, stop_when: Callable[[], bool] = lambda: False, run_hash: str = "", value: str | None = None
) -> None:
    """GET of the owner answers, once `stop_when()`, with the stop annotation `value` (default: one naming run
    `run_hash`, "enough"); its status always holds a stopRequest for that run too, which nothing may read.
    PATCH of its status is recorded."""
    kube_api.serve_status(OWNER_PATH + "/status")

    def handle(request: BaseHTTPRequestHandler) -> None:
        annotations = {STOP_ANNOTATION: value or f"{run_hash}: enough"} if stop_when() else {}
        status = {"stopRequest": "enough", "runHash": run_hash}
        body = json.dumps({"kind": "StyleLoRA", "metadata": {"annotations": annotations}, "status": status})
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body.encode())

    kube_api.server.routes[OWNER_PATH] = handle


def in_store(spec_path: str, rootfs: Path, memory_store: Any, images: Path, output_uri: str) -> RunSpec:
    """Rewrite the RunSpec at `spec_path` to an object store: the board's dataset copied there, the output there."""
    for image in images.iterdir():
        memory_store.pipe_file(f"/bucket{DATASET}/{image.name}", image.read_bytes())
    path = rootfs / spec_path.lstrip("/")
    spec = RunSpec.from_json(path.read_text())
    work = spec.work.model_copy(update={"dataset_uri": f"memory://bucket{DATASET}"})
    spec = spec.model_copy(update={"output_uri": output_uri, "output_display_uri": output_uri, "work": work})
    path.write_text(spec.to_json())
    return spec


def progress_reports(kube_api: KubeApi) -> list[dict[str, Any]]:
    return [p.json()["status"]["progress"] for p in kube_api.patches]  # type: ignore[index]


def output(rootfs: Path) -> Path:
    return rootfs / OUTPUT.lstrip("/")


def test_train_publishes_the_lora_and_reports_progress(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "REPORT_INTERVAL_S", 0.0)
    serve_owner(kube_api)
    assert train.main(runspec(rootfs, tiny_klein, two_images)) == 0

    lora = load_file(output(rootfs) / "lora.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    sidecar = json.loads((output(rootfs) / "lora.json").read_text())
    assert (sidecar["backend"], sidecar["trained_steps"], sidecar["uri"]) == (
        "builtin",
        6,
        f"{DISPLAY}/lora.safetensors",
    )
    assert sidecar["plan_hash"] and sidecar["runspec_hash"]
    assert sorted(p.name for p in (output(rootfs) / "work" / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
        "step_000006",
    ]

    reports = progress_reports(kube_api)
    assert {r["step"] for r in reports} == {"train"} and len({r["runHash"] for r in reports}) == 1
    assert reports[0]["state"] == "Running" and reports[-1]["state"] == "Succeeded"
    steps = [r["progress"]["step"] for r in reports if r["state"] == "Running"]
    assert steps == sorted(steps) and max(steps) == 6
    live = next(r["progress"] for r in reports if r["progress"]["step"] == 3)
    assert live["totalSteps"] == 6 and live["loss"] > 0 and live["secondsPerStep"] > 0 and live["etaSeconds"] >= 0
    assert [c["step"] for c in live["checkpoints"]] == [2]
    result = reports[-1]["result"]
    assert result["lora_file"] == f"{DISPLAY}/lora.safetensors"
    assert (result["steps"], result["stopped_early"], result["stop_reason"]) == (6, False, "completed")
    assert [c["step"] for c in result["checkpoints"]] == [2, 4, 6]
    assert result["checkpoints"][0]["uri"] == f"{DISPLAY}/work/checkpoints/step_000002"
    assert (rootfs / "dev/termination-log").read_text().startswith("trained 6 steps")


def test_a_stop_request_promotes_the_latest_checkpoint(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)

    def checkpointed() -> bool:
        return any(r.get("progress", {}).get("checkpoints") for r in progress_reports(kube_api))

    spec_path = runspec(rootfs, tiny_klein, two_images)
    run_id = run_id_of(rootfs, spec_path)
    serve_owner(kube_api, checkpointed, run_hash=run_id)
    assert train.main(spec_path) == 0

    final = progress_reports(kube_api)[-1]
    assert final["state"] == "Succeeded"
    result = final["result"]
    assert (result["steps"], result["stopped_early"]) == (2, True)
    assert result["stop_reason"] == "stop requested: enough"  # the reason the annotation gave
    promoted = load_file(output(rootfs) / "lora.safetensors")
    checkpoint = load_file(output(rootfs) / "work/checkpoints/step_000002/lora.safetensors")
    assert promoted.keys() == checkpoint.keys()
    assert all((promoted[k] == checkpoint[k]).all() for k in promoted)
    assert not (output(rootfs) / "work/checkpoints/step_000006").exists()


def test_a_full_volume_fails_at_once_with_exit_3_and_keeps_the_checkpoints_saved(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the second checkpoint on, torch's writer writes to /dev/full, which answers every write with ENOSPC as
    a full volume does: torch's own error (no errno in it) must read as a full volume, not as a retryable crash."""
    import torch

    real_save = torch.save
    saves: list[object] = []

    def save(obj: object, target: object, *args: Any, **kwargs: Any) -> None:
        saves.append(target)
        real_save(obj, target if len(saves) == 1 else "/dev/full", *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    serve_owner(kube_api)
    assert train.main(runspec(rootfs, tiny_klein, two_images)) == EXIT_VOLUME_FULL

    message = (rootfs / "dev/termination-log").read_text()
    assert message.startswith("the artifacts volume is full (No space left on device")
    assert "free space or grow the claim; checkpoints already saved are kept" in message
    assert progress_reports(kube_api)[-1]["state"] == "Failed"
    checkpoints = output(rootfs) / "work/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002"]  # no half-written step 4 left
    saved = checkpoints / "step_000002"
    assert load_file(saved / "lora.safetensors") and torch.load(saved / "training_state.pt", weights_only=False)


PROXY_PROBES = EvaluationSpec(prompts=1, seeds=2, size=32, steps=2)  # no evaluation model: proxies


@pytest.fixture
def probes(rootfs: Path, tiny_evaluators: Path) -> EvaluationSpec:
    """The probes, scored by (tiny) real models in the pod's /models: what early stopping may act on."""
    models = rootfs / "models"
    models.mkdir(exist_ok=True)
    for name in (STYLE_DIR, TEXT_DIR, CONTENT_DIR):
        (models / name).symlink_to(tiny_evaluators / name, target_is_directory=True)
    paths = {"style_embedder_path": STYLE_DIR, "text_model_path": TEXT_DIR, "embedder_path": CONTENT_DIR}
    return PROXY_PROBES.model_copy(update={key: f"/models/{name}" for key, name in paths.items()})


def same_file(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def test_checkpoints_are_scored_and_the_best_one_becomes_the_lora(
    probes: EvaluationSpec, rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path
) -> None:
    serve_owner(kube_api)
    spec_path = runspec(rootfs, tiny_klein, two_images, evaluation=probes, stopping={"patience": 20})
    assert train.main(spec_path) == 0

    result = progress_reports(kube_api)[-1]["result"]
    evaluation = result["evaluation"]
    assert len(evaluation["baseline"]["style"]) == 2
    assert [c["step"] for c in evaluation["checkpoints"]] == [2, 4, 6]
    best = decide_reported(EvaluationReport.model_validate(evaluation), StoppingSettings(patience=20)).best_step
    assert result["best_checkpoint"] == best == result["lora_step"] and result["steps"] == 6
    assert result["stop_reason"] == "completed" and not any(c["step"] > 6 for c in result["checkpoints"])
    if best:  # a random tiny model has no style to learn: whether a LoRA beats the base is the scores' to say
        assert same_file(
            output(rootfs) / "lora.safetensors", output(rootfs) / f"work/checkpoints/step_{best:06d}/lora.safetensors"
        )
        assert json.loads((output(rootfs) / "lora.json").read_text())["trained_steps"] == best
    else:
        assert not (output(rootfs) / "lora.safetensors").exists() and result["lora_file"] is None
    assert len(list((output(rootfs) / "work/evaluation").glob("step_*.json"))) == 4  # the base model and 3 checkpoints
    # Every step's probes, the base model first, in one sheet beside the run's artifacts: 4 rows of 2 probes.
    with Image.open(output(rootfs) / "checkpoint_gallery.png") as gallery:
        assert gallery.height > 4 * 128 and gallery.width >= 2 * 128


STYLE_AT = {0: 0.1, 1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4, 5: 0.3, 6: 0.2}  # a peak at step 2, then a fall


def scripted_peak(self: Evaluator, step: int, lora_file: Path | None) -> ProbeScores:
    return ProbeScores(step, (STYLE_AT[step], STYLE_AT[step] + 0.01), (0.9, 0.9), (0.2, 0.2))


def test_early_stopping_stops_when_scores_fall_and_promotes_the_best(
    probes: EvaluationSpec,
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scores scripted per step (a random tiny model has no style to learn): they peak at step 2 and fall."""
    monkeypatch.setattr(Evaluator, "score", scripted_peak)
    serve_owner(kube_api)
    spec_path = runspec(
        rootfs, tiny_klein, two_images, evaluation=probes, stopping={"patience": 1, "warmupSteps": 0}, checkpointEvery=1
    )
    assert train.main(spec_path) == 0

    result = progress_reports(kube_api)[-1]["result"]
    # Smoothed over two evaluations J peaks at step 3; step 4 shows no improvement: stop before step 5.
    assert result["stop_reason"].startswith("early stopping: step 4") and result["stopped_early"]
    assert (result["best_checkpoint"], result["lora_step"], result["steps"]) == (2, 2, 4)
    assert not (output(rootfs) / "work/checkpoints/step_000005").exists()
    assert same_file(
        output(rootfs) / "lora.safetensors", output(rootfs) / "work/checkpoints/step_000002/lora.safetensors"
    )


def test_when_no_checkpoint_passes_the_guards_the_latest_is_promoted_with_a_warning(
    probes: EvaluationSpec,
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def drifting(self: Evaluator, step: int, lora_file: Path | None) -> ProbeScores:
        adherence = 1.0 if step == 0 else 0.1  # every checkpoint stops drawing the prompts
        return ProbeScores(step, (0.5, 0.5), (adherence, adherence), (0.2, 0.2))

    monkeypatch.setattr(Evaluator, "score", drifting)
    serve_owner(kube_api)
    assert train.main(runspec(rootfs, tiny_klein, two_images, evaluation=probes, stopping={"patience": 20})) == 0
    result = progress_reports(kube_api)[-1]["result"]
    # The guards failed at steps 2 and 4: the run stops there and the latest checkpoint is all there is.
    assert result["stop_reason"].startswith("early stopping: step 4: two evaluations in a row failed the guards")
    assert result["best_checkpoint"] is None and result["lora_step"] == 4
    assert "no checkpoint passed the early-stopping guards (adherence fell 90% below" in result["warnings"][0]


def worse(self: Evaluator, step: int, lora_file: Path | None) -> ProbeScores:
    """Scores in which each checkpoint improves and none reaches the base model."""
    style = 0.9 if step == 0 else 0.5 + 0.01 * step
    return ProbeScores(step, (style, style + 0.01), (0.9, 0.9), (0.2, 0.2))


def test_a_lora_scoring_below_the_base_model_is_not_promoted(
    probes: EvaluationSpec,
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Evaluator, "score", worse)
    serve_owner(kube_api)
    assert train.main(runspec(rootfs, tiny_klein, two_images, evaluation=probes, stopping={"patience": 20})) == 0
    result = progress_reports(kube_api)[-1]["result"]
    assert (result["best_checkpoint"], result["lora_step"], result["lora_file"]) == (0, 0, None)
    assert not (output(rootfs) / "lora.safetensors").exists()
    assert result["warnings"][0].startswith("every checkpoint scored below the base model (best J 0.5650, base 0.9050)")


def test_without_evaluation_models_the_scores_are_proxies_and_nothing_stops_early(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores of test_early_stopping_stops_when_scores_fall_and_promotes_the_best, with no model to measure
    them (a content model named but not in the cache, none named for style and adherence): they are proxies, said
    so, and pick nothing: the run trains its planned steps and the last checkpoint becomes the LoRA."""
    monkeypatch.setattr(Evaluator, "score", scripted_peak)
    serve_owner(kube_api)
    probes = PROXY_PROBES.model_copy(update={"embedder_path": "/models/dinov2"})
    spec = runspec(
        rootfs, tiny_klein, two_images, evaluation=probes, stopping={"patience": 1, "warmupSteps": 0}, checkpointEvery=1
    )
    assert train.main(spec) == 0

    result = progress_reports(kube_api)[-1]["result"]
    assert (result["stop_reason"], result["lora_step"], result["steps"]) == ("completed", 6, 6)
    assert result["best_checkpoint"] is None and not result["stopped_early"]
    proxies = result["evaluation"]["proxies"]
    assert set(proxies) == {"style", "adherence", "leakage"}
    assert "checkpointEvaluation.styleEmbedderDir is not set" in proxies["style"]
    assert "no model at /models/dinov2 (checkpointEvaluation.embedderDir)" in proxies["leakage"]
    assert "colour moments" in proxies["style"] and "not measured" in proxies["adherence"]
    assert any(w.startswith("checkpoint scores are proxies") for w in result["warnings"])
    assert same_file(
        output(rootfs) / "lora.safetensors", output(rootfs) / "work/checkpoints/step_000006/lora.safetensors"
    )


def test_an_evaluation_model_that_cannot_be_loaded_exits_2(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path
) -> None:
    serve_owner(kube_api)
    broken = rootfs / "models" / "dinov2"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    probes = PROXY_PROBES.model_copy(update={"embedder_path": "/models/dinov2"})
    assert train.main(runspec(rootfs, tiny_klein, two_images, evaluation=probes)) == 2
    assert "checkpointEvaluation.embedderDir" in (rootfs / "dev/termination-log").read_text()


def test_two_step_mode_trains_content_then_style_on_top(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "REPORT_INTERVAL_S", 0.0)
    serve_owner(kube_api)
    runspec(rootfs, tiny_klein, two_images)  # links the model and the dataset into the rootfs
    plan = plan_training(2, {"backend": "builtin", "mode": "two-step", "training": QUICK}, {"maxSteps": 4})
    assert plan.content_stage.value == {"rank": 16, "steps": 4}
    assert train.main(write_spec(rootfs, plan, "builtin", "/models/tiny")) == 0

    content = output(rootfs) / "work/content/lora.safetensors"
    assert content.is_file()  # the content stage's LoRA stays in the work folder; it is not the artifact
    styled = load_file(output(rootfs) / "lora.safetensors")
    assert styled.keys() == load_file(content).keys()
    assert not same_file(output(rootfs) / "lora.safetensors", content)
    stages = [r["progress"].get("stage") for r in progress_reports(kube_api)]
    assert stages.index("content") < stages.index("style") and stages[-1] == "style"
    assert progress_reports(kube_api)[-1]["result"]["steps"] == 4


def test_two_step_on_an_object_store_keeps_the_content_lora_for_the_next_pod(
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    memory_store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import tempfile

    serve_owner(kube_api)
    runspec(rootfs, tiny_klein, two_images)
    plan = plan_training(2, {"backend": "builtin", "mode": "two-step", "training": QUICK}, {"maxSteps": 4})
    remote = f"memory://bucket{OUTPUT}"
    in_store(write_spec(rootfs, plan, "builtin", "/models/tiny"), rootfs, memory_store, two_images, remote)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "pod-1"))
    assert train.main(SPEC_PATH) == 0
    content = memory_store.cat_file(f"/bucket{OUTPUT}/work/content/lora.safetensors")
    before = len(progress_reports(kube_api))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "pod-2"))  # a pod after the report was lost
    assert train.main(SPEC_PATH) == 0
    assert all(r["progress"].get("stage") != "content" for r in progress_reports(kube_api)[before:])
    assert (tmp_path / "pod-2").rglob("content/lora.safetensors")
    assert next((tmp_path / "pod-2").rglob("content/lora.safetensors")).read_bytes() == content


def test_two_step_mode_on_aitoolkit_exits_2(rootfs: Path, kube_api: KubeApi) -> None:
    serve_owner(kube_api)
    plan = plan_training(6, {"backend": "builtin", "mode": "two-step"})
    assert train.main(write_spec(rootfs, plan, "ai-toolkit", "/models/tiny")) == 2
    assert "builtin" in (rootfs / "dev/termination-log").read_text()


def test_a_resumed_pod_reports_the_checkpoints_of_the_pods_before_it(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)
    spec_path = runspec(rootfs, tiny_klein, two_images)
    run_id = run_id_of(rootfs, spec_path)
    stop = {"now": True}
    serve_owner(
        kube_api,
        lambda: stop["now"] and bool(progress_reports(kube_api)[-1]["progress"]["checkpoints"]),
        run_hash=run_id,
    )
    assert train.main(spec_path) == 0  # stopped after the step-2 checkpoint
    stop["now"] = False
    before = len(progress_reports(kube_api))
    assert train.main(spec_path) == 0  # the next pod resumes and trains on to step 6
    later = [r for r in progress_reports(kube_api)[before:] if r["progress"]["step"] >= 3]
    assert [c["step"] for c in later[0]["progress"]["checkpoints"]][:1] == [2]


def test_on_an_object_store_the_dataset_is_fetched_checkpoints_mirrored_and_a_new_pod_resumes(
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    memory_store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import tempfile

    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)
    remote = f"memory://bucket{OUTPUT}"
    spec = in_store(runspec(rootfs, tiny_klein, two_images), rootfs, memory_store, two_images, remote)
    stop = {"now": True}
    serve_owner(
        kube_api,
        lambda: stop["now"] and bool(progress_reports(kube_api)[-1]["progress"]["checkpoints"]),
        run_hash=spec.run_id(),
    )
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "pod-1"))  # each pod has its own /tmp
    assert train.main(SPEC_PATH) == 0  # stopped after the step-2 checkpoint, which is in the store
    checkpoints = f"/bucket{OUTPUT}/work/checkpoints"
    assert memory_store.exists(f"{checkpoints}/step_000002/_COMPLETE")

    stop["now"] = False
    before = len(progress_reports(kube_api))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "pod-2"))  # a new pod on another node: empty scratch
    assert train.main(SPEC_PATH) == 0
    later = progress_reports(kube_api)[before:]
    assert min(r["progress"]["step"] for r in later if r["state"] == "Running" and r["progress"]["step"]) >= 3
    assert [s.rsplit("/", 1)[-1] for s in memory_store.ls(checkpoints, detail=False)] == [
        "step_000002",
        "step_000004",
        "step_000006",
    ]
    published = memory_store.cat_file(f"/bucket{OUTPUT}/lora.safetensors")
    assert published == memory_store.cat_file(f"{checkpoints}/step_000006/lora.safetensors")
    assert later[-1]["result"]["lora_file"] == f"{remote}/lora.safetensors"


@pytest.mark.parametrize(
    "value",
    [
        "0123456789: enough",  # a stop asked of an earlier run (its id): it stopped that run, not this one
        "enough",  # names no run
        None,  # no annotation at all: the status's stopRequest for this very run is not a request
    ],
)
def test_only_an_annotation_naming_this_run_stops_it(
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
) -> None:
    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)
    spec_path = runspec(rootfs, tiny_klein, two_images)
    serve_owner(kube_api, lambda: value is not None, run_hash=run_id_of(rootfs, spec_path), value=value)
    assert train.main(spec_path) == 0
    assert progress_reports(kube_api)[-1]["result"]["stop_reason"] == "completed"


def test_bad_input_exits_2_with_a_clear_message(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, tmp_path: Path
) -> None:
    serve_owner(kube_api)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main(runspec(rootfs, tiny_klein, empty)) == 2
    message = (rootfs / "dev/termination-log").read_text()
    assert "bad input" in message and "holds no images" in message
    assert progress_reports(kube_api)[-1]["state"] == "Failed"


def test_a_target_naming_no_layer_exits_2(rootfs: Path, tiny_klein: Path, two_images: Path) -> None:
    spec = runspec(rootfs, tiny_klein, two_images, targetBlocks="custom", blocks=["single_blocks.20"])
    assert train.main(spec) == 2
    assert "match no LoRA-targetable linear" in (rootfs / "dev/termination-log").read_text()


def test_a_missing_model_exits_2(rootfs: Path, tiny_klein: Path, two_images: Path) -> None:
    spec = runspec(rootfs, tiny_klein, two_images)
    (rootfs / "models" / "tiny").unlink()
    assert train.main(spec) == 2
    assert "model_index.json missing" in (rootfs / "dev/termination-log").read_text()


# --- the ai-toolkit backend, against the test double of ai-toolkit's run.py ---------------------------------------

DOUBLE = Path(__file__).parents[1] / "data" / "aitoolkit_double"


def aitoolkit_runspec(
    rootfs: Path, name: str, model_path: str = "/models/klein", evaluation: EvaluationSpec | None = None
) -> str:
    from kleinstyle.contract.aitoolkit import aitoolkit_config

    plan = plan_training(12, {"training": {"steps": 20, "checkpointEvery": 5}, "earlyStopping": {"patience": 20}})
    spec_path = write_spec(rootfs, plan, "ai-toolkit", model_path, evaluation)
    config = aitoolkit_config(
        plan,
        name=name,
        dataset_dir=DATASET,
        training_folder=f"{OUTPUT}/aitoolkit",  # where the operator puts it (kleinstyle.operator.kinds.stylelora)
        trigger_word="tokstyle",
        model_path=model_path,
    )
    (rootfs / "etc/kleinstyle/aitoolkit.yaml").write_text(yaml.safe_dump(config))
    return spec_path


def test_aitoolkit_backend_publishes_its_final_file(
    rootfs: Path, kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    serve_owner(kube_api)
    spec_path = aitoolkit_runspec(rootfs, "wc-lora")
    assert train.main(spec_path) == 0
    final = output(rootfs) / "aitoolkit/wc-lora/wc-lora.safetensors"
    assert (output(rootfs) / "lora.safetensors").read_bytes() == final.read_bytes()
    result = progress_reports(kube_api)[-1]["result"]
    assert (result["steps"], result["stop_reason"]) == (20, "completed")
    assert [c["step"] for c in result["checkpoints"]] == [5, 10, 15]  # the last step is only the final file
    assert result["checkpoints"][0]["uri"] == f"{DISPLAY}/aitoolkit/wc-lora/wc-lora_000000005.safetensors"

    # A pod restarted after ai-toolkit finished (its report lost) publishes again without launching it.
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(rootfs / "no-ai-toolkit-here"))
    assert train.main(spec_path) == 0
    assert progress_reports(kube_api)[-1]["state"] == "Succeeded"


@pytest.mark.parametrize(("peak", "published"), [(10, "wc-lora_000000010.safetensors"), (20, "wc-lora.safetensors")])
def test_aitoolkit_checkpoints_and_final_file_are_judged(
    probes: EvaluationSpec,
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    peak: int,
    published: str,
) -> None:
    """Scores scripted by step (the double's files hold no LoRA): the best one is published, and ai-toolkit's final
    file, which has no step checkpoint beside it, is judged as the last step."""

    def scripted(self: Evaluator, step: int, lora_file: Path | None) -> ProbeScores:
        style = 0.1 if step == 0 else 1.0 - abs(step - peak) / 20
        return ProbeScores(step, (style, style + 0.01), (0.9, 0.9), (0.2, 0.2))

    monkeypatch.setattr(Evaluator, "score", scripted)
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    serve_owner(kube_api)
    runspec(rootfs, tiny_klein, two_images)  # puts the tiny model and the dataset where the RunSpec points
    assert train.main(aitoolkit_runspec(rootfs, "wc-lora", "/models/tiny", probes)) == 0
    result = progress_reports(kube_api)[-1]["result"]
    assert [c["step"] for c in result["evaluation"]["checkpoints"]] == [5, 10, 15, 20]
    assert result["best_checkpoint"] == result["lora_step"] == peak
    chosen = output(rootfs) / "aitoolkit/wc-lora" / published
    assert (output(rootfs) / "lora.safetensors").read_bytes() == chosen.read_bytes()


def test_a_stopped_aitoolkit_run_never_promotes_a_cut_off_checkpoint(
    rootfs: Path, kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)
    spec_path = aitoolkit_runspec(rootfs, "wc-truncate")
    run_id = run_id_of(rootfs, spec_path)
    folder = output(rootfs) / "aitoolkit/wc-truncate"
    serve_owner(kube_api, lambda: len(list(folder.glob("wc-truncate_*.safetensors"))) >= 2, run_hash=run_id)
    assert train.main(spec_path) == 0
    result = progress_reports(kube_api)[-1]["result"]
    assert result["stop_reason"] == "stop requested: enough" and result["steps"] == 5  # step 10's save was cut off
    assert (output(rootfs) / "lora.safetensors").read_bytes() == (
        folder / "wc-truncate_000000005.safetensors"
    ).read_bytes()


def test_aitoolkit_failures_are_named(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    assert train.main(aitoolkit_runspec(rootfs, "wc-nomodel")) == 2
    assert (rootfs / "dev/termination-log").read_text().startswith("ModelMissing")


def test_a_save_cut_off_by_a_killed_pod_is_discarded_and_the_next_pod_resumes(
    rootfs: Path, kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ai-toolkit resumes from its newest file and fails on every start when that file is cut off (seen with the
    real trainer); the launcher deletes such a file first, so the run goes on from the checkpoint before it."""
    from kleinstyle.runtime.aitoolkit_run import is_complete

    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    spec_path = aitoolkit_runspec(rootfs, "wc-killed")
    folder = output(rootfs) / "aitoolkit/wc-killed"
    folder.mkdir(parents=True)
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    whole = len(header).to_bytes(8, "little") + header + bytes(4)
    (folder / "wc-killed_000000005.safetensors").write_bytes(whole)
    (folder / "wc-killed_000000010.safetensors").write_bytes(whole[:20])  # the pod was killed during this save
    serve_owner(kube_api, run_hash=run_id_of(rootfs, spec_path))
    assert train.main(spec_path) == 0
    result = progress_reports(kube_api)[-1]["result"]
    assert result["stop_reason"] == "completed" and result["steps"] == 20
    assert is_complete(folder / "wc-killed_000000010.safetensors")  # saved again, whole, by the resumed run


# --- `kleinstyle train --model DIR --data DIR ...` on one machine ---------------------------------------------------


def test_train_on_one_machine_prints_each_training_size_and_writes_the_lora(
    tiny_klein: Path, dataset: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kleinstyle.cli.main import main as kleinstyle

    data = dataset(["tok. a hill", "tok. a boat"], sizes=[(512, 512), (600, 400)])
    out = tmp_path / "out"
    args = ["--model", str(tiny_klein), "--data", str(data), "--trigger", "tok", "--rank", "4", "--steps", "2"]
    assert kleinstyle(["train", *args, "--resolution", "1024", "--checkpoint-every", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # At resolution 1024, a 512x512 reference trains at 512x512: never upscaled; a larger one is downscaled.
    assert printed[:2] == ["000.png: 512x512", "001.png: 576x384 (from 600x400)"]
    assert printed[2] == f"LoRA: {out / 'lora.safetensors'}"
    assert load_file(out / "lora.safetensors") and json.loads((out / "lora.json").read_text())["trigger_word"] == "tok"
    assert sorted(p.name for p in (out / "work/checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_train_on_one_machine_names_bad_input(
    tiny_klein: Path, two_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kleinstyle.cli.main import main as kleinstyle

    common = ["--trigger", "t", "-o", str(tmp_path / "out")]
    assert kleinstyle(["train", "--model", str(tmp_path), "--data", str(two_images), *common]) == 2
    assert "--model " in (err := capsys.readouterr().err) and "model_index.json missing" in err
    assert kleinstyle(["train", "--model", str(tiny_klein), "--data", str(tmp_path / "none"), *common]) == 2
    assert "--data: dataset folder" in capsys.readouterr().err
    assert kleinstyle(["train", "--model", str(tiny_klein)]) == 2
    assert "--data, --trigger, -o required" in capsys.readouterr().err


@pytest.mark.parametrize("stopped", [False, True], ids=["completed", "stopped"])
def test_an_aitoolkit_lora_scoring_below_the_base_model_is_not_published(
    probes: EvaluationSpec,
    rootfs: Path,
    kube_api: KubeApi,
    tiny_klein: Path,
    two_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    stopped: bool,
) -> None:
    """Both backends choose the checkpoint to publish alike: where the base model beats every checkpoint, none is
    published, whether ai-toolkit ran its steps out or was stopped (a stop once crashed on it, and a completed run
    published its final file although the judge said it scored below the base model)."""
    monkeypatch.setattr(Evaluator, "score", worse)
    monkeypatch.setenv("AI_TOOLKIT_DIR", str(DOUBLE))
    monkeypatch.setattr(step, "STOP_POLL_S", 0.0)
    runspec(rootfs, tiny_klein, two_images)
    spec_path = aitoolkit_runspec(rootfs, "wc-lora", "/models/tiny", probes)
    folder = output(rootfs) / "aitoolkit/wc-lora"
    if stopped:
        saved = lambda: len(list(folder.glob("wc-lora_*.safetensors"))) >= 2  # noqa: E731
        serve_owner(kube_api, saved, run_hash=run_id_of(rootfs, spec_path))
    else:
        serve_owner(kube_api)
    assert train.main(spec_path) == 0
    result = progress_reports(kube_api)[-1]["result"]
    assert (result["lora_step"], result["lora_file"]) == (0, None)
    assert not (output(rootfs) / "lora.safetensors").exists()


def test_sigterm_during_training_exits_1_for_the_next_pod_to_resume(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop nobody asked for is SIGTERM (preemption, eviction): exit 1, so the Job's next pod resumes; in
    two-step mode the content stage ends there and the style stage never starts."""
    real = lora_train.train_lora
    stages: list[Path] = []

    def terminated(model: Any, data: Any, out: Path, cfg: Any, **kwargs: Any) -> Any:
        stages.append(out)
        return real(model, data, out, cfg, **{**kwargs, "should_stop": lambda: True})

    monkeypatch.setattr(lora_train, "train_lora", terminated)
    serve_owner(kube_api)
    assert train.main(runspec(rootfs, tiny_klein, two_images)) == 1
    assert "the next pod resumes" in progress_reports(kube_api)[-1]["message"]
    stages.clear()
    plan = plan_training(2, {"backend": "builtin", "mode": "two-step", "training": QUICK}, {"maxSteps": 4})
    assert train.main(write_spec(rootfs, plan, "builtin", "/models/tiny")) == 1
    assert len(stages) == 1  # the content stage only


def test_train_on_one_machine_scores_checkpoints_with_the_model_folders_given(
    tiny_klein: Path,
    tiny_evaluators: Path,
    dataset: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`kleinstyle train --evaluate` with the three model folders: every score by its model, no proxy said; without
    them, each score's proxy is named."""
    from kleinstyle.cli.main import main as kleinstyle

    data = dataset(["tok. a hill", "tok. a boat"])
    args = ["--model", str(tiny_klein), "--data", str(data), "--trigger", "tok", "--rank", "4", "--steps", "2"]
    args += ["--resolution", "64", "--checkpoint-every", "2", "--evaluate", "--probe-steps", "1"]
    models = ["--style-model", str(tiny_evaluators / STYLE_DIR), "--text-model", str(tiny_evaluators / TEXT_DIR)]
    models += ["--content-model", str(tiny_evaluators / CONTENT_DIR)]
    assert kleinstyle(["train", *args, *models, "-o", str(tmp_path / "real")]) == 0
    assert "proxies" not in caplog.text
    scored = sorted(p.name for p in (tmp_path / "real/work/evaluation").glob("step_*.json"))
    assert scored == ["step_000000.json", "step_000002.json"]
    assert kleinstyle(["train", *args, "-o", str(tmp_path / "proxy")]) == 0
    assert "checkpoint scores are proxies" in caplog.text and "checkpointEvaluation.textModelDir" in caplog.text


def test_train_on_one_machine_takes_the_training_options(
    tiny_klein: Path, dataset: Callable[..., Path], tmp_path: Path
) -> None:
    """The spec's training options as flags of `kleinstyle train`: what the checkpoint says it trained with."""
    from kleinstyle.cli.main import main as kleinstyle

    data = dataset(["tok. a hill", "tok. a boat"])
    out = tmp_path / "out"
    args = ["--model", str(tiny_klein), "--data", str(data), "--trigger", "tok", "--rank", "4", "--steps", "1"]
    options = ["--timestep-bias", "style", "--noise-offset", "0.05", "--flip", "--ema-decay", "0.9"]
    assert kleinstyle(["train", *args, *options, "--gradient-checkpointing", "--resolution", "64", "-o", str(out)]) == 0
    settings = json.loads((out / "work/checkpoints/step_000001/metadata.json").read_text())["settings"]
    wanted = {"timestep_bias": "style", "noise_offset": 0.05, "ema_decay": 0.9, "gradient_checkpointing": True}
    assert {key: settings[key] for key in wanted} == wanted
    assert any("flip" in key and value is True for key, value in settings.items()), settings
