"""The tiny Klein pipeline: the real diffusers layout, loadable offline, deterministic, renders on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from kleinstyle.runtime.klein.arch import lora_linear_names
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS, write_tiny_klein


def _render(pipe: Flux2KleinPipeline, seed: int = 0) -> np.ndarray:
    return pipe(
        prompt="tokstyle. a red house by a lake",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        text_encoder_out_layers=TINY_TEXT_ENCODER_LAYERS,
        output_type="np",
    ).images


def test_layout_is_the_diffusers_klein_layout(tiny_klein: Path) -> None:
    index = json.loads((tiny_klein / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["is_distilled"] is False
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_klein / component).is_dir()


def test_loads_offline_and_renders_deterministically(tiny_klein: Path) -> None:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.config
    assert transformer.guidance_embeds is False
    assert transformer.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.num_hidden_layers == 3
    assert TINY_TEXT_ENCODER_LAYERS == (1, 2, 3)

    image = _render(pipe)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    np.testing.assert_array_equal(image, _render(pipe))
    assert not np.array_equal(image, _render(pipe, seed=1))


def test_chat_template_matches_what_the_pipeline_sends(tiny_klein: Path) -> None:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, transformer=None, vae=None)
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = pipe.tokenizer(text)["input_ids"]
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|im_start|>" and "<|im_end|>" in tokens and "</think>" in tokens
    embeds, text_ids = pipe.encode_prompt("a cat", max_sequence_length=32, text_encoder_out_layers=(1, 2, 3))
    assert embeds.shape == (1, 32, 96) and text_ids.shape == (1, 32, 4)


def test_transformer_has_the_real_lora_targets(tiny_klein: Path) -> None:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, text_encoder=None, tokenizer=None, vae=None)
    names = lora_linear_names(pipe.transformer)
    assert len(names) == 2 * 12 + 2 * 2
    assert "transformer_blocks.1.ff_context.linear_out" in names
    assert "single_transformer_blocks.1.attn.to_out" in names


def test_same_seed_same_bytes_other_seed_other_weights(tiny_klein: Path, tmp_path: Path) -> None:
    again = write_tiny_klein(tmp_path / "again", seed=0)
    other = write_tiny_klein(tmp_path / "other", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    for name in (weights, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / name).read_bytes() == (tiny_klein / name).read_bytes()
    assert (again / "tokenizer/tokenizer.json").read_bytes() == (tiny_klein / "tokenizer/tokenizer.json").read_bytes()
    assert (other / weights).read_bytes() != (tiny_klein / weights).read_bytes()


def test_refuses_to_overwrite_a_pipeline(tiny_klein: Path) -> None:
    with pytest.raises(FileExistsError):
        write_tiny_klein(tiny_klein)
