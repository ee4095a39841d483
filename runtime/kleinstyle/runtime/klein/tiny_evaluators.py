"""Tiny random evaluation models in the layouts the checkpoint judge loads (kleinstyle.runtime.klein.evaluate):
a CSD (a CLIP vision tower and its style projection), a CLIP with text and vision towers, and a DINOv2, each in the
transformers layout with its processor. For tests and the CPU demo: the real-model code paths, without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The writers import torch and transformers when called: the folder names below are read without them.

HIDDEN = 32
_TOWER: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
_IMAGE: dict[str, Any] = {"image_size": 32, "patch_size": 8}
_CROP: dict[str, Any] = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
# What each score's folder is called under a models folder (`write_tiny_evaluators`).
STYLE_DIR, TEXT_DIR, CONTENT_DIR = "csd", "clip", "dinov2"


def write_tiny_csd(folder: Path, *, seed: int = 0, style_dim: int = 24) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .evaluate import CSD_PROJECTION

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**_TOWER, **_IMAGE)).save_pretrained(folder)
    CLIPImageProcessor(**_CROP).save_pretrained(folder)
    save_file({"weight": torch.randn(style_dim, HIDDEN)}, folder / CSD_PROJECTION)
    return folder


def write_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .tiny import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    text = {
        **_TOWER,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 16,
        # CLIP pools the text at its end token: here, the first padding after the prompt.
        "eos_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config={**_TOWER, **_IMAGE}, projection_dim=16)).save_pretrained(
        folder
    )
    CLIPImageProcessor(**_CROP).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path, *, seed: int = 0, crop: int = 32) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**_TOWER, **_IMAGE)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}).save_pretrained(folder)
    return folder


def write_tiny_evaluators(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """All three under `folder` (STYLE_DIR, TEXT_DIR, CONTENT_DIR); by the score each measures."""
    return {
        "style": write_tiny_csd(folder / STYLE_DIR, seed=seed),
        "adherence": write_tiny_clip(folder / TEXT_DIR, seed=seed),
        "leakage": write_tiny_dinov2(folder / CONTENT_DIR, seed=seed),
    }
