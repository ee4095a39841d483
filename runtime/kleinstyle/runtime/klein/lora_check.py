"""Check that a LoRA file fits a klein transformer before it is loaded, naming the first key or shape that does not.

diffusers' `load_lora_weights` skips keys that name no layer of the transformer (and keys without the
`transformer.` prefix) with only a logged warning, and fails on a wrong shape with a bare state-dict traceback. A
LoRA made for another base model (FLUX.1's 3072-wide layers, an SDXL LoRA) would thus render the base model
unchanged, or crash. The file is read through diffusers' own conversion (`Flux2KleinPipeline.lora_state_dict`: the
kleinstyle/diffusers keys, peft, kohya and ai-toolkit/BFL formats), so the check sees exactly the keys the loader
will use, and compares each with the transformer built on the meta device from the model's config (no weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

PREFIX = "transformer."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


class LoraMismatch(ValueError):
    """The file is not a LoRA for this transformer; the message names the file and the first misfit."""


@dataclass(frozen=True)
class LoraFit:
    """A LoRA that fits: its converted state dict (what `load_lora_weights` should be given), layers and rank."""

    state_dict: dict[str, torch.Tensor]
    layers: int
    rank: int


def transformer_skeleton(model_dir: str | Path) -> nn.Module:
    """The model's transformer on the meta device: every layer and shape, no weights read (instant even for 9B)."""
    config = Flux2Transformer2DModel.load_config(Path(model_dir), subfolder="transformer")
    with torch.device("meta"):
        skeleton: nn.Module = Flux2Transformer2DModel.from_config(config)
    return skeleton


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's state dict converted to diffusers keys (`transformer.<module>.lora_A.weight`, ...)."""
    path = Path(path)
    if not path.is_file():
        raise LoraMismatch(f"no LoRA file at {path}")
    try:
        raw = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise LoraMismatch(f"{path} is not a readable safetensors file: {exc}") from exc
    if not raw:
        raise LoraMismatch(f"{path} holds no tensors")
    try:
        state: dict[str, torch.Tensor] = Flux2KleinPipeline.lora_state_dict(raw)
        return state
    except (ValueError, KeyError, IndexError) as exc:  # the ai-toolkit/kohya converters reject unknown block keys
        raise LoraMismatch(f"{path} is not a FLUX.2 LoRA diffusers can read: {_short(exc)}") from exc


def check_lora_fits(state_dict: Mapping[str, torch.Tensor], transformer: nn.Module, label: str) -> LoraFit:
    """`state_dict` (diffusers keys) against `transformer`: every key a lora_A/lora_B of one of its Linear layers,
    in_features and out_features as the layer's, A and B of one layer with one rank. Raises LoraMismatch."""
    modules = dict(transformer.named_modules())
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):  # a scale the loader folds in; not a layer
            continue
        if not key.startswith(PREFIX):
            raise LoraMismatch(f"{label}: key {key} is not for the transformer (no '{PREFIX}' prefix)")
        match = _LORA_KEY.match(key[len(PREFIX) :])
        if match is None:
            raise LoraMismatch(f"{label}: key {key} is not a lora_A/lora_B weight; only LoRA adapters are supported")
        name, side, shape = match["module"], match["side"], tuple(tensor.shape)
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            what = "no layer" if layer is None else f"no Linear layer (it is a {type(layer).__name__})"
            raise LoraMismatch(f"{label}: key {key}: this klein transformer has {what} named {name}; {_ANOTHER_BASE}")
        if len(shape) != 2:
            raise LoraMismatch(f"{label}: key {key} has shape {list(shape)}; a LoRA weight is a matrix")
        if side == "A" and shape[1] != layer.in_features:
            raise LoraMismatch(
                f"{label}: key {key} has shape {list(shape)}: it takes {shape[1]} inputs where {name} takes "
                f"{layer.in_features}; {_ANOTHER_BASE}"
            )
        if side == "B" and shape[0] != layer.out_features:
            raise LoraMismatch(
                f"{label}: key {key} has shape {list(shape)}: it gives {shape[0]} outputs where {name} gives "
                f"{layer.out_features}; {_ANOTHER_BASE}"
            )
        shapes.setdefault(name, {})[side] = shape
    if not shapes:
        raise LoraMismatch(f"{label}: no LoRA weights for the transformer in the file")
    ranks = set()
    for name, sides in shapes.items():
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise LoraMismatch(f"{label}: layer {name} has no {missing} weight")
        if sides["A"][0] != sides["B"][1]:
            raise LoraMismatch(
                f"{label}: layer {name}: lora_A has rank {sides['A'][0]} but lora_B rank {sides['B'][1]}"
            )
        ranks.add(sides["A"][0])
    return LoraFit(state_dict=dict(state_dict), layers=len(shapes), rank=max(ranks))


def check_lora(path: str | Path, transformer: nn.Module) -> LoraFit:
    """Read the LoRA at `path` and check it fits `transformer` (see `transformer_skeleton`)."""
    return check_lora_fits(read_lora(path), transformer, str(path))


_ANOTHER_BASE = "a LoRA made for another base model (FLUX.1, another klein size)?"


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
