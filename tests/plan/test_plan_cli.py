"""`kleinstyle plan`: policy-true plans and the exact ai-toolkit configs for 2, 6, 12 and 31 references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kleinstyle.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = str(ROOT / "examples" / "stylelora.yaml")
MODEL = "/models/FLUX.2-klein-base-9B"


@pytest.mark.parametrize("images", [2, 6, 12, 31])
def test_aitoolkit_config_matches_its_golden_file(images, capsys):
    args = [EXAMPLE, "--images", str(images), "-o", "aitoolkit", "--trigger", "bd9style", "--model-path", MODEL]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert out == (GOLDEN / f"aitoolkit-{images}.yaml").read_text()
    config = yaml.safe_load(out)
    process = config["config"]["process"][0]
    assert config["job"] == "extension" and process["type"] == "sd_trainer"
    assert process["model"]["arch"] == "flux2_klein_9b" and process["model"]["name_or_path"] == MODEL
    assert process["network"]["linear"] == process["network"]["linear_alpha"]  # ai-toolkit: alpha = rank
    assert process["save"]["max_step_saves_to_keep"] > process["train"]["steps"] // process["save"]["save_every"]


def test_json_plan_and_warnings(capsys):
    assert main(["plan", EXAMPLE, "--images", "2", "-o", "json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["variant"] == "B_r128" and plan["text_pipeline"]["value"] is False
    assert "nothing works reliably" in captured.err


def test_block_filters_keep_their_trailing_dot(tmp_path, capsys):
    lora = yaml.safe_load(Path(EXAMPLE).read_text())
    lora["spec"]["training"] = {"targetBlocks": "custom", "blocks": ["single_blocks.1", "double_blocks.7"]}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(lora))
    assert main(["plan", str(path), "--images", "12", "-o", "aitoolkit"]) == 0
    network = yaml.safe_load(capsys.readouterr().out)["config"]["process"][0]["network"]
    assert network["network_kwargs"]["only_if_contains"] == ["single_blocks.1.", "double_blocks.7."]


def test_an_invalid_stylelora_is_refused_with_the_field(tmp_path, capsys):
    lora = yaml.safe_load(Path(EXAMPLE).read_text())
    lora["spec"]["training"] = {"rank": 48}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(lora))
    assert main(["plan", str(path), "--images", "12"]) == 2
    assert "spec.training.rank" in capsys.readouterr().err
