"""CSD's published checkpoint rewritten into the layout `CSDStyleEmbedder` loads (kleinstyle.runtime.klein.evaluate).

CSD (Somepalli et al., "Measuring Style Similarity in Diffusion Models", arXiv 2404.01292) publishes one torch file,
`pytorch_model.bin` in tomg-group-umd/CSD-ViT-L: the training checkpoint of its `CSD_CLIP` model (github
learn2phoenix/CSD, CSD/model.py), a dict {model_state_dict, opt_bb, opt_proj, iter, args, fp16_scaler}. The state
dict was saved through DataParallel, so every key starts with `module.`:
- `module.backbone.*`: OpenAI CLIP's ViT-L/14 `VisionTransformer` (clip/model.py) with its `proj` removed: conv1,
  class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}, ln_post;
- `module.last_layer_style` (width x style dim, 1024 x 768): the style head, applied as `ln_post(cls) @ W`;
- `module.last_layer_content`: the content head, unused for style.

The evaluator wants a transformers `CLIPVisionModel` folder (config.json, model.safetensors, preprocessor_config.json)
whose pooler output is that same `ln_post(cls)`, and `csd_style_projection.safetensors` holding `weight` =
last_layer_style transposed (style dim x width). Every key is mapped by name and loaded strictly: a key left over,
missing or misshaped is an error, never a half-loaded model. The pickle is read with torch's weights_only loader and
an allow-list of the few non-tensor types the checkpoint holds (its argparse Namespace, numpy scalars), so no code in
the file runs.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Any

CSD_PROJECTION = "csd_style_projection.safetensors"  # evaluate.CSD_PROJECTION (a test keeps the two equal)
_BACKBONE = "backbone."
_STYLE, _CONTENT = "last_layer_style", "last_layer_content"
# OpenAI CLIP's preprocessing (clip/clip.py): bicubic resize of the short side, centre crop, these mean/std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QKV = ("q", "k", "v")  # the order of the three projections stacked in attn.in_proj_*
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# OpenAI block names -> transformers' CLIPEncoderLayer names (transformers 5's CLIPVisionModel: no `vision_model.`
# prefix) (attn.in_proj_* is split into q, k and v below).
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",  # sic: transformers' name
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


class CSDCheckpointError(ValueError):
    """The file is not CSD's checkpoint as published: what differs is in the message."""


def _allowed_globals() -> list[Any]:
    """The non-tensor types a CSD training checkpoint pickles, and nothing else."""
    import numpy as np

    multiarray = importlib.import_module("numpy._core.multiarray")
    allowed: list[Any] = [
        argparse.Namespace,
        np.dtype,
        multiarray.scalar,
        (multiarray.scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x pickled it under
    ]
    for name in ("Float64DType", "Float32DType", "Int64DType", "BoolDType"):
        if (dtype_class := getattr(np.dtypes, name, None)) is not None:
            allowed.append(dtype_class)
            allowed.append((dtype_class, f"numpy.dtype[{name.removesuffix('DType').lower()}]"))
    return allowed


def load_csd_state(path: Path) -> dict[str, Any]:
    """The model state dict of CSD's checkpoint, `module.` stripped, read without running pickled code."""
    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # refused by the allow-list, not a torch file, cut short
        raise CSDCheckpointError(f"{path.name}: not a CSD checkpoint torch can read safely ({exc})") from exc
    state = raw.get("model_state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CSDCheckpointError(f"{path.name}: no model_state_dict (CSD's checkpoint is a training checkpoint)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def clip_vision_state(state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(transformers CLIPVisionModel state dict, the style head `last_layer_style`) from CSD's state dict."""
    import torch

    unexpected = [k for k in state if not k.startswith(_BACKBONE) and k not in (_STYLE, _CONTENT)]
    if unexpected:
        raise CSDCheckpointError(f"unexpected keys in CSD's state dict: {', '.join(sorted(unexpected)[:5])}")
    if _STYLE not in state:
        raise CSDCheckpointError(f"no {_STYLE} (CSD's style head) in the state dict")
    converted: dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith(_BACKBONE):
            continue
        name = key.removeprefix(_BACKBONE)
        if name in _TOP_NAMES:
            converted[f"{_TOP_NAMES[name]}"] = value
            continue
        block = _BLOCK.fullmatch(name)
        if block is None:
            # `proj` too: CSD sets the backbone's projection to None and keeps the style head apart.
            raise CSDCheckpointError(f"backbone key {key!r} is not part of CLIP's vision transformer")
        index, rest = block.groups()
        prefix = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for part, tensor in zip(_QKV, torch.chunk(value, 3, dim=0), strict=True):
                converted[f"{prefix}self_attn.{part}_proj.{kind}"] = tensor.contiguous()
        elif rest in _BLOCK_NAMES:
            converted[prefix + _BLOCK_NAMES[rest]] = value
        else:
            raise CSDCheckpointError(f"backbone key {key!r} is not part of CLIP's residual block")
    return converted, state[_STYLE]


def vision_config(converted: dict[str, Any], *, heads: int | None = None) -> dict[str, Any]:
    """CLIPVisionConfig's arguments read off the weights' shapes; heads: OpenAI's rule, width / 64."""
    try:
        patch = converted["embeddings.patch_embedding.weight"]
        positions = converted["embeddings.position_embedding.weight"].shape[0]
        fc1 = converted["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CSDCheckpointError(f"the backbone has no {exc.args[0]} (after renaming)") from exc
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CSDCheckpointError(f"positional_embedding has {positions} rows, not a square grid plus the class token")
    layers = len({k.split(".")[2] for k in converted if k.startswith("encoder.layers.")})
    heads = heads or width // 64
    if heads < 1 or width % heads:
        raise CSDCheckpointError(f"width {width} does not split into {heads} attention heads")
    return {
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": "quick_gelu",  # OpenAI's CLIP
        "layer_norm_eps": 1e-5,  # torch's LayerNorm default, which OpenAI's CLIP uses
    }


def convert_csd(checkpoint: Path, out: Path, *, heads: int | None = None) -> Path:
    """Write `out` (created; must not exist): the CLIP vision tower, its processor and CSD's style projection."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    converted, style = clip_vision_state(load_csd_state(checkpoint))
    config = vision_config(converted, heads=heads)
    if style.ndim != 2 or style.shape[0] != config["hidden_size"]:
        raise CSDCheckpointError(
            f"{_STYLE} has shape {tuple(style.shape)}, not (width {config['hidden_size']}, style dim)"
        )
    model = CLIPVisionModel(CLIPVisionConfig(**config, projection_dim=int(style.shape[1])))
    try:
        result = model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CSDCheckpointError(f"the renamed backbone does not fit CLIPVisionModel: {exc}") from exc
    # position_ids is a buffer transformers builds itself; every weight must come from the checkpoint.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise CSDCheckpointError(
            f"the renamed backbone does not fit CLIPVisionModel: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    out.mkdir(parents=True, exist_ok=False)
    model.save_pretrained(out)  # safetensors
    size = config["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)
    save_file({"weight": style.float().T.contiguous()}, str(out / CSD_PROJECTION))
    return out
