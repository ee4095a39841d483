"""Facts about the FLUX.2 [klein] architecture in diffusers that the trainer and the generator share.

Kept apart from the trainer so that generation, fusion and the ai-toolkit backend name blocks and text-encoder
layers exactly the way training does (docs/facts.md#klein-in-diffusers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:  # torch is imported where a model is at hand: fusion reads these tables without it
    from torch import nn

# Klein embeds a prompt as the Qwen3 hidden states of three decoder layers, stacked on the feature axis. The real
# text encoders (Qwen3-8B for 9B, Qwen3-4B for 4B) have 36 layers and Klein reads layers (9, 18, 27): a quarter, a
# half and three quarters of the way up. `hidden_states[0]` is the embedding output, so index i is decoder layer i.
KLEIN_TEXT_ENCODER_LAYERS: tuple[int, int, int] = (9, 18, 27)

# The klein 9B transformer's diffusers config (docs/facts.md: 8 double + 24 single blocks, 32 heads x 128, Qwen3-8B's
# 3 x 4096 text features); the benchmarks build it with random weights, since the real weights are gated.
KLEIN_9B_TRANSFORMER: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 24,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "joint_attention_dim": 12288,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "guidance_embeds": False,
}

DOUBLE_BLOCKS = "transformer_blocks"
SINGLE_BLOCKS = "single_transformer_blocks"

# The LoRA-targetable linears of each block kind, relative to the block. Klein has no conv layers.
DOUBLE_BLOCK_LINEARS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
SINGLE_BLOCK_LINEARS: tuple[str, ...] = ("attn.to_qkv_mlp_proj", "attn.to_out")

NAMED_TARGETS = ("all", "single", "double")

_BLOCK_LINEAR = re.compile(
    rf"^(?P<kind>{DOUBLE_BLOCKS}|{SINGLE_BLOCKS})\.(?P<index>\d+)\.(?P<linear>.+)$",
)


def text_encoder_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """The hidden-state indices Klein stacks for a text encoder with `num_hidden_layers` decoder layers.

    ceil(k * n / 4) for k = 1, 2, 3: exactly (9, 18, 27) for the real 36-layer encoders, and three distinct
    existing layers for small test encoders ((1, 2, 3) for 3 layers), so the tiny pipeline exercises the same
    stacking code path. Pass the result as `text_encoder_out_layers` to the pipeline and to prompt encoding.
    """
    if num_hidden_layers < 3:
        raise ValueError(f"Klein stacks three text-encoder layers; this encoder has only {num_hidden_layers}")
    first, second, third = (math.ceil(k * num_hidden_layers / 4) for k in (1, 2, 3))
    return first, second, third


def lora_linear_names(transformer: nn.Module) -> list[str]:
    """Every LoRA-targetable linear of a Klein transformer, by its full diffusers module name, in module order."""
    from torch import nn

    names = []
    for name, module in transformer.named_modules():
        match = _BLOCK_LINEAR.match(name)
        if match is None or not isinstance(module, nn.Linear):
            continue
        allowed = DOUBLE_BLOCK_LINEARS if match["kind"] == DOUBLE_BLOCKS else SINGLE_BLOCK_LINEARS
        if match["linear"] in allowed:
            names.append(name)
    return names


def select_lora_targets(transformer: nn.Module, target: str | Sequence[str]) -> list[str]:
    """Resolve a target spec to full module names.

    `target` is "all", "single" (single-stream blocks: the "style" blocks on Klein), "double", or a list of
    diffusers module-name prefixes such as "single_transformer_blocks.3." (keep the trailing dot: without it
    "single_transformer_blocks.1" also matches 10-19, as in ai-toolkit's substring filters). A prefix that
    selects nothing is an error, so a FLUX.1 block number or an ai-toolkit name fails loudly instead of
    silently training nothing.
    """
    names = lora_linear_names(transformer)
    if isinstance(target, str):
        if target not in NAMED_TARGETS:
            raise ValueError(f"target must be one of {NAMED_TARGETS} or a list of module-name prefixes, not {target!r}")
        if target == "all":
            return names
        kind = SINGLE_BLOCKS if target == "single" else DOUBLE_BLOCKS
        return [n for n in names if n.startswith(kind + ".")]
    return _by_prefixes(names, target)


def _by_prefixes(names: list[str], prefixes: Iterable[str]) -> list[str]:
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("target prefix list is empty")
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched:
        raise ValueError(
            f"target prefixes {unmatched} match no LoRA-targetable linear; use diffusers names such as "
            f"'{SINGLE_BLOCKS}.0.' or '{DOUBLE_BLOCKS}.0.' (this model has {_block_counts(names)})"
        )
    return [n for n in names if any(n.startswith(p) for p in prefixes)]


def _block_counts(names: list[str]) -> str:
    double = {m["index"] for n in names if (m := _BLOCK_LINEAR.match(n)) and m["kind"] == DOUBLE_BLOCKS}
    single = {m["index"] for n in names if (m := _BLOCK_LINEAR.match(n)) and m["kind"] == SINGLE_BLOCKS}
    return f"{len(double)} double-stream and {len(single)} single-stream blocks"


# The klein transformers by the shape parameters that fix their LoRA-targetable linears (diffusers config names).
# Base and distilled models of one size share every shape; only metadata can tell them apart.
class KleinSize(TypedDict):
    """The shape parameters of one klein transformer (`block_linear_shapes`' arguments)."""

    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    mlp_ratio: float


KLEIN_SIZES: dict[str, KleinSize] = {
    "klein-9b": {
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "attention_head_dim": 128,
        "mlp_ratio": 3.0,
    },
    "klein-4b": {
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "mlp_ratio": 3.0,
    },
}


def block_linear_shapes(
    *, num_layers: int, num_single_layers: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float
) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-targetable linear, by full module name, computed from the config alone.

    Mirrors diffusers' Flux2Transformer2DModel (checked against a meta-device model in the tests) so that fusion
    and its benchmark know the shapes without importing diffusers or allocating a model. The feed-forwards are
    SwiGLU (linear_in doubles the hidden width); a single block fuses q, k, v and the MLP input in one projection.
    """
    dim = num_attention_heads * attention_head_dim
    mlp = int(dim * mlp_ratio)
    double = {name: (dim, dim) for name in DOUBLE_BLOCK_LINEARS}
    for ff in ("ff", "ff_context"):
        double[f"{ff}.linear_in"] = (2 * mlp, dim)
        double[f"{ff}.linear_out"] = (dim, mlp)
    single = {"attn.to_qkv_mlp_proj": (3 * dim + 2 * mlp, dim), "attn.to_out": (dim, dim + mlp)}
    shapes = {}
    for index in range(num_layers):
        shapes.update({f"{DOUBLE_BLOCKS}.{index}.{name}": double[name] for name in DOUBLE_BLOCK_LINEARS})
    for index in range(num_single_layers):
        shapes.update({f"{SINGLE_BLOCKS}.{index}.{name}": single[name] for name in SINGLE_BLOCK_LINEARS})
    return shapes
