"""CSD's published checkpoint -> the evaluator's layout (kleinstyle.runtime.models.csd), on a tiny random checkpoint
shaped as tomg-group-umd/CSD-ViT-L's pytorch_model.bin: the converted CLIP vision tower and projection give CSD's own
style output (OpenAI CLIP's forward, tests/support/tiny_csd.py), so any wrong key mapping fails here."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from kleinstyle.runtime.models import csd
from kleinstyle.runtime.models.csd import CSD_PROJECTION, CSDCheckpointError, convert_csd
from safetensors.torch import load_file

from tests.support.tiny_csd import HEADS, IMAGE, STYLE_DIM, csd_state, csd_style, write_csd_checkpoint


def _converted_style(folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(folder).eval()
    projection = load_file(str(folder / CSD_PROJECTION))["weight"]
    with torch.no_grad():
        return model(pixel_values=pixels).pooler_output @ projection.T


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def test_converted_tower_gives_csds_style_output(tmp_path: Path, pixels: torch.Tensor) -> None:
    state = csd_state(seed=1)
    out = convert_csd(write_csd_checkpoint(tmp_path / "pytorch_model.bin", state=state), tmp_path / "csd", heads=HEADS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", CSD_PROJECTION]
    )
    assert load_file(str(out / CSD_PROJECTION))["weight"].shape == (STYLE_DIM, 32)
    expected = csd_style(state, pixels)
    torch.testing.assert_close(_converted_style(out, pixels), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mistake",
    [
        ("_QKV", ("k", "q", "v")),
        (
            "_BLOCK_NAMES",
            {**csd._BLOCK_NAMES, "ln_1.weight": "layer_norm2.weight", "ln_2.weight": "layer_norm1.weight"},
        ),
        ("_TOP_NAMES", {**csd._TOP_NAMES, "ln_pre.bias": "post_layernorm.bias", "ln_post.bias": "pre_layrnorm.bias"}),
    ],
    ids=["q-k-swapped", "norms-swapped", "pre-post-swapped"],
)
def test_a_wrong_mapping_changes_the_style_output(
    tmp_path: Path, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch, mistake: tuple[str, object]
) -> None:
    """The check above is sharp: a mapping that loads (same shapes) but pairs the wrong tensors is caught."""
    monkeypatch.setattr(csd, *mistake)
    state = csd_state(seed=1)
    out = convert_csd(write_csd_checkpoint(tmp_path / "pytorch_model.bin", state=state), tmp_path / "csd", heads=HEADS)
    assert not torch.allclose(_converted_style(out, pixels), csd_style(state, pixels), rtol=1e-4, atol=1e-5)


def test_evaluator_loads_the_converted_folder(tmp_path: Path) -> None:
    from kleinstyle.runtime.klein import evaluate
    from PIL import Image

    assert evaluate.CSD_PROJECTION == CSD_PROJECTION
    out = convert_csd(write_csd_checkpoint(tmp_path / "pytorch_model.bin"), tmp_path / "csd", heads=HEADS)
    style = evaluate.CSDStyleEmbedder(out).style([Image.new("RGB", (48, 40), (200, 30, 30))] * 2)
    assert style.shape == (2, STYLE_DIM)
    torch.testing.assert_close(style.norm(dim=1), torch.ones(2))


def test_vit_l_shapes_give_vit_l_config() -> None:
    """Shapes of the real checkpoint (ViT-L/14 at 224: width 1024, 24 blocks, 257 positions) give CLIP ViT-L/14's
    config, heads by OpenAI's rule (width / 64 = 16)."""
    meta = {"device": "meta"}
    converted = {
        "embeddings.patch_embedding.weight": torch.empty(1024, 3, 14, 14, **meta),
        "embeddings.position_embedding.weight": torch.empty(257, 1024, **meta),
        **{f"encoder.layers.{i}.mlp.fc1.weight": torch.empty(4096, 1024, **meta) for i in range(24)},
    }
    config = csd.vision_config(converted)
    assert config == {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def test_heads_that_do_not_divide_the_width_are_refused() -> None:
    converted, _ = csd.clip_vision_state({k.removeprefix("module."): v for k, v in csd_state().items()})
    with pytest.raises(CSDCheckpointError, match="heads"):
        csd.vision_config(converted)  # tiny width 32 // 64 = 0 heads: refused, never a silent guess


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("module.last_layer_style"), "last_layer_style"),
        (lambda s: s.__setitem__("module.backbone.proj", torch.zeros(32, 24)), "backbone.proj"),
        (lambda s: s.__setitem__("module.extra_head", torch.zeros(1)), "extra_head"),
        (lambda s: s.pop("module.backbone.transformer.resblocks.1.mlp.c_fc.bias"), "missing"),
        (
            lambda s: s.__setitem__("module.backbone.transformer.resblocks.0.ln_1.weight", torch.ones(16)),
            "does not fit",
        ),
    ],
    ids=["no-style-head", "proj-kept", "unknown-key", "key-missing", "wrong-shape"],
)
def test_a_checkpoint_not_shaped_as_csds_is_refused(tmp_path: Path, change, message: str) -> None:
    state = csd_state()
    change(state)
    checkpoint = write_csd_checkpoint(tmp_path / "pytorch_model.bin", state=state)
    with pytest.raises(CSDCheckpointError, match=message):
        convert_csd(checkpoint, tmp_path / "csd", heads=HEADS)
    assert not (tmp_path / "csd").exists()


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model_state_dict": csd_state(), "args": Payload()}, path, pickle_module=pickle)
    with pytest.raises(CSDCheckpointError, match="safely"):
        convert_csd(path, tmp_path / "csd", heads=HEADS)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"<html>a login page, not weights</html>")
    with pytest.raises(CSDCheckpointError, match=r"pytorch_model\.bin"):
        convert_csd(path, tmp_path / "csd", heads=HEADS)
