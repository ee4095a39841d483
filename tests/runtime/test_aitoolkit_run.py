"""The ai-toolkit launcher against real progress-line formats and a test double of ai-toolkit's run.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kleinstyle.contract.aitoolkit import aitoolkit_config
from kleinstyle.contract.plan import plan_training
from kleinstyle.runtime.aitoolkit_run import checkpoints, classify_failure, is_complete, launch, parse_progress

DOUBLE = Path(__file__).parent / "data" / "aitoolkit_double"


@pytest.mark.parametrize(
    ("line", "step", "total", "loss", "lr"),
    [
        (
            "bd9-lora:  12%|#2        | 360/3000 [06:12<45:30,  1.03s/it, lr: 1.0e-04 loss: 3.456e-01]",
            360,
            3000,
            0.3456,
            1e-4,
        ),
        ("bd9:   0%|          | 0/1000 [00:00<?, ?it/s]", 0, 1000, None, None),
        (
            "a:  1%| | 10/1000 [00:09<15:00, lr: 1.0e-04 loss: 4.1e-01]\ra:  1%| | 11/1000 [00:10<15:00, lr: 9.9e-05 "
            "loss: 3.9e-01]",
            11,
            1000,
            0.39,
            9.9e-5,
        ),
    ],
)
def test_progress_lines(line, step, total, loss, lr):
    progress = parse_progress(line)
    assert (progress.step, progress.total) == (step, total)
    assert progress.loss == pytest.approx(loss) if loss is not None else progress.loss is None
    assert progress.lr == pytest.approx(lr) if lr is not None else progress.lr is None


def test_only_whole_safetensors_files_are_complete(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    whole = len(header).to_bytes(8, "little") + header + bytes(8)
    for name, data, complete in [("whole", whole, True), ("cut", whole[:-3], False), ("junk", b"lora", False)]:
        (tmp_path / name).write_bytes(data)
        assert is_complete(tmp_path / name) is complete, name
    assert not is_complete(tmp_path / "missing")


def test_lines_without_progress_are_ignored():
    assert parse_progress("Loading model from black-forest-labs/FLUX.2-klein-base-9B") is None


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "OutOfMemory"),
        ("OSError: /models/x is not a local folder and is not a valid model identifier", "ModelMissing"),
        ("ValueError: no images found in /artifacts/dataset", "BadDataset"),
        ("Segmentation fault", "TrainerFailed"),
    ],
)
def test_failures_are_named(tail, reason):
    assert classify_failure(tail)[0] == reason


def _config(tmp_path: Path, name: str, steps: int = 20) -> Path:
    plan = plan_training(12, {"training": {"steps": 100, "checkpointEvery": 50}})
    config = aitoolkit_config(
        plan, name=name, dataset_dir="/d", training_folder=str(tmp_path / "out"), trigger_word="t"
    )
    config["config"]["process"][0]["train"]["steps"] = steps
    config["config"]["process"][0]["save"]["save_every"] = 5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_run_reports_progress_and_leaves_checkpoints(tmp_path):
    seen = []
    outcome = launch(_config(tmp_path, "bd9"), toolkit_dir=DOUBLE, on_progress=seen.append)
    assert outcome.exit_code == 0 and outcome.failure is None
    assert [p.step for p in seen] == list(range(1, 21))
    assert seen[-1].loss == pytest.approx(0.05, rel=1e-3)
    assert [step for step, _ in checkpoints(tmp_path / "out", "bd9")] == [5, 10, 15]  # the last step is the final file


def test_a_stop_request_ends_the_run_and_a_restart_resumes(tmp_path):
    config = _config(tmp_path, "bd9", steps=400)
    stopped = launch(config, toolkit_dir=DOUBLE, should_stop=lambda: len(checkpoints(tmp_path / "out", "bd9")) >= 2)
    assert stopped.stopped and stopped.last.step < 400
    resumed = []
    launch(config, toolkit_dir=DOUBLE, on_progress=resumed.append)
    assert resumed[0].step > 10  # continued after its newest checkpoint, as ai-toolkit does
    assert checkpoints(tmp_path / "out", "bd9")[-1][0] == 395 and (tmp_path / "out/bd9/bd9.safetensors").is_file()


@pytest.mark.parametrize(("name", "reason"), [("bd9-oom", "OutOfMemory"), ("bd9-nomodel", "ModelMissing")])
def test_a_failed_run_is_named(tmp_path, name, reason):
    outcome = launch(_config(tmp_path, name), toolkit_dir=DOUBLE)
    assert outcome.exit_code == 1 and outcome.failure[0] == reason


def test_an_image_without_ai_toolkit_fails_the_run_naming_why(tmp_path):
    outcome = launch(_config(tmp_path, "bd9"), toolkit_dir=tmp_path / "no-ai-toolkit")
    assert outcome.failure is not None and outcome.failure[0] == "AIToolkitMissing"
    assert "backend builtin" in outcome.failure[1] and not outcome.stopped
