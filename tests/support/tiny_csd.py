"""A tiny random CSD checkpoint shaped as the published one (tomg-group-umd/CSD-ViT-L's pytorch_model.bin), and
CSD's own forward pass over it, written from OpenAI CLIP's VisionTransformer and CSD_CLIP (github openai/CLIP
clip/model.py, learn2phoenix/CSD CSD/model.py) independently of the conversion under test.

The published file is a training checkpoint: {model_state_dict, opt_bb, opt_proj, iter, args, fp16_scaler}, the
state dict saved through DataParallel (`module.` prefixes): `backbone.*` (the vision transformer without `proj`),
`last_layer_style` and `last_layer_content` (width x 768). The tiny one has the same keys, prefixes and pickled
extras (an argparse Namespace, numpy scalars), at width 32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WIDTH, LAYERS, HEADS, PATCH, IMAGE, STYLE_DIM = 32, 2, 2, 8, 32, 24


def csd_state(*, seed: int = 0) -> dict[str, torch.Tensor]:
    """CSD_CLIP's state dict keys (with DataParallel's `module.`) at tiny widths; norms are not all ones, so a
    swapped norm changes the output."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(WIDTH, scale=0.3), f"{prefix}.bias": rand(WIDTH)}

    grid = IMAGE // PATCH
    backbone: dict[str, torch.Tensor] = {
        "class_embedding": rand(WIDTH),
        "positional_embedding": rand(grid * grid + 1, WIDTH),
        "conv1.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.05),
        **norm("ln_pre"),
        **norm("ln_post"),
    }
    for i in range(LAYERS):
        block = f"transformer.resblocks.{i}"
        backbone |= {
            **norm(f"{block}.ln_1"),
            **norm(f"{block}.ln_2"),
            f"{block}.attn.in_proj_weight": rand(3 * WIDTH, WIDTH),
            f"{block}.attn.in_proj_bias": rand(3 * WIDTH),
            f"{block}.attn.out_proj.weight": rand(WIDTH, WIDTH),
            f"{block}.attn.out_proj.bias": rand(WIDTH),
            f"{block}.mlp.c_fc.weight": rand(4 * WIDTH, WIDTH),
            f"{block}.mlp.c_fc.bias": rand(4 * WIDTH),
            f"{block}.mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH),
            f"{block}.mlp.c_proj.bias": rand(WIDTH),
        }
    state = {f"module.backbone.{k}": v for k, v in backbone.items()}
    state["module.last_layer_style"] = rand(WIDTH, STYLE_DIM)
    state["module.last_layer_content"] = rand(WIDTH, STYLE_DIM)
    return state


def write_csd_checkpoint(path: Path, *, seed: int = 0, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The training checkpoint as CSD's train_csd.py saves it, around `state` (default: csd_state(seed))."""
    state = csd_state(seed=seed) if state is None else state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_state_dict": state,
            "opt_bb": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 3e-5, "params": [0]}]},
            "opt_proj": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [1]}]},
            "iter": 1000,
            "args": argparse.Namespace(arch="vit_large", lr=3e-5, lam_sty=1.0, content_proj_head="default"),
            "fp16_scaler": {"scale": np.float64(65536.0), "growth_tracker": np.int64(12)},
        },
        path,
    )
    return path


@torch.no_grad()
def csd_style(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """CSD_CLIP's style output before normalisation: ln_post(cls) @ last_layer_style, by OpenAI CLIP's forward."""
    s = {k.removeprefix("module."): v for k, v in state.items()}
    b = "backbone."
    x = F.conv2d(pixels, s[b + "conv1.weight"], stride=PATCH)
    x = x.reshape(x.shape[0], WIDTH, -1).permute(0, 2, 1)
    cls = s[b + "class_embedding"].expand(x.shape[0], 1, WIDTH)
    x = torch.cat([cls, x], dim=1) + s[b + "positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), s[b + "ln_pre.weight"], s[b + "ln_pre.bias"], eps=1e-5)
    x = x.permute(1, 0, 2)  # sequence first, as nn.MultiheadAttention in CLIP
    for i in range(LAYERS):
        p = f"{b}transformer.resblocks.{i}."
        attention = torch.nn.MultiheadAttention(WIDTH, HEADS)
        attention.load_state_dict(
            {
                "in_proj_weight": s[p + "attn.in_proj_weight"],
                "in_proj_bias": s[p + "attn.in_proj_bias"],
                "out_proj.weight": s[p + "attn.out_proj.weight"],
                "out_proj.bias": s[p + "attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (WIDTH,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], eps=1e-5)
        x = x + attention(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (WIDTH,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], eps=1e-5)
        h = F.linear(h, s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    pooled = F.layer_norm(x[:, 0], (WIDTH,), s[b + "ln_post.weight"], s[b + "ln_post.bias"], eps=1e-5)
    return pooled @ s["last_layer_style"]
