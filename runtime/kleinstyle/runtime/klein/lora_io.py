"""Read a klein LoRA in any of the formats it comes in, as one normal form, and check that several fit together.

Normal form (`LoraFile.layers`): {diffusers module name: Factors(A, B, scale)}, the update of that linear being
exactly `scale * B @ A` (A: rank x in, B: out x rank). Module names are the diffusers ones kleinstyle publishes
(`transformer_blocks.0.attn.to_q`, `single_transformer_blocks.3.attn.to_qkv_mlp_proj`, without `transformer.`).
Tensors are numpy views of the file (no copies, no torch; see tensorfile), the scale a number, so reading costs
no arithmetic. `LoraFile.state_dict()` gives the torch state dict diffusers' `load_lora_weights` takes.

Formats, told apart key by key:
- kleinstyle artifacts and diffusers: `transformer.<module>.lora_A.weight` / `.lora_B.weight`;
- peft: `[base_model.model.]<module>.lora_A[.<adapter>].weight`;
- ai-toolkit and BFL (ComfyUI): `diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`, also spelled
  `lora_down` / `lora_up`;
- kohya: `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`, `.lora_up.weight` and `.alpha`.
BFL modules are renamed as diffusers' own Flux2 conversion does. A BFL double block fuses q, k and v in one
projection (`img_attn.qkv`, `txt_attn.qkv`) where diffusers has three linears: the fused update B @ A splits into
row blocks B_q @ A, B_k @ A, B_v @ A, so A is shared and B is cut in three equal row blocks, exactly.

Scale: `.alpha` keys give alpha / rank (kohya, some BFL exports); diffusers' `lora_adapter_metadata` header gives
lora_alpha / r (with its alpha_pattern); otherwise 1 (alpha = rank: what ai-toolkit writes for klein and what
kleinstyle bakes into lora_B).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .arch import KLEIN_SIZES, block_linear_shapes
from .lora_format import COMPONENT_PREFIX
from .tensorfile import FLOATS, Stored, read_safetensors

if TYPE_CHECKING:
    import torch


class LoraFormatError(ValueError):
    """The file is not a LoRA this reader understands; the message names the file and the key."""


class IncompatibleLoras(ValueError):
    """LoRAs that cannot be combined (another base model, a layer the base lacks, a shape mismatch)."""


class Factors(NamedTuple):
    """One linear's update, `scale * B @ A`."""

    A: Stored  # rank x in
    B: Stored  # out x rank
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the linear this updates."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> np.ndarray:
        """The dense update in float64 (for tests and small layers only)."""
        return self.scale * (self.B.float32().astype(np.float64) @ self.A.float32().astype(np.float64))


@dataclass
class LoraFile:
    label: str  # the path or URI as the user gave it, for messages
    layers: dict[str, Factors]
    keys: dict[str, str]  # module -> the file's own lora_A key, for messages
    format: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.layers.values()), default=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The update as torch tensors under diffusers keys (`transformer.<module>.lora_A/B.weight`), the scale
        folded into lora_B: what diffusers' `load_lora_weights` takes."""
        out: dict[str, torch.Tensor] = {}
        for module, f in self.layers.items():
            B = f.B if f.scale == 1.0 else Stored.from_float32(f.B.float32() * np.float32(f.scale), f.B.dtype)
            out[f"{COMPONENT_PREFIX}{module}.lora_A.weight"] = f.A.to_torch()
            out[f"{COMPONENT_PREFIX}{module}.lora_B.weight"] = B.to_torch()
        return out


# ---- key names --------------------------------------------------------------------------------------------------

# (suffix, role); the first that matches wins.
_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".alpha", "alpha"),
)
_PEFT_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
_PREFIXES = ("base_model.model.", COMPONENT_PREFIX, "diffusion_model.", "model.diffusion_model.")
_KOHYA = "lora_unet_"

# BFL (ai-toolkit, ComfyUI) module -> diffusers modules; several targets = a fused projection split by rows.
_BFL_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_BFL_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
_BFL_OTHER = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
}
_BFL_BLOCK = re.compile(r"^(?P<kind>double_blocks|single_blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
# kohya spells BFL names with underscores: lora_unet_double_blocks_0_img_attn_qkv.
_KOHYA_BLOCK = re.compile(r"^(?P<kind>double_blocks|single_blocks)_(?P<index>\d+)_(?P<rest>.+)$")
_KOHYA_NAMES = {name.replace(".", "_"): name for name in (*_BFL_DOUBLE, *_BFL_SINGLE, *_BFL_OTHER)}
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
_DIFFUSERS_TOP = (*BLOCK_PREFIXES, *_BFL_OTHER.values())


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(format, module as the file names it, role A/B/alpha, peft adapter name) of a key; None for a non-LoRA key."""
    match = _PEFT_ADAPTER.match(key)
    if match:
        module, role, adapter = match["module"], match["ab"], match["adapter"]
    else:
        found = next(((key[: -len(suffix)], role) for suffix, role in _SUFFIXES if key.endswith(suffix)), None)
        if found is None:
            return None
        (module, role), adapter = found, ""
    if module.startswith(_KOHYA):
        return "kohya", module[len(_KOHYA) :], role, adapter
    prefix = next((p for p in _PREFIXES if module.startswith(p)), "")
    fmt = {"": "peft", "base_model.model.": "peft", COMPONENT_PREFIX: "diffusers"}.get(prefix, "bfl")
    return fmt, module[len(prefix) :], role, adapter


def _diffusers_modules(fmt: str, module: str) -> tuple[str, ...] | None:
    """The diffusers module(s) a module name of the file stands for; None when it is not a klein module."""
    if fmt == "kohya":
        match = _KOHYA_BLOCK.match(module)
        if match:
            rest = _KOHYA_NAMES.get(match["rest"])
            module = f"{match['kind']}.{match['index']}.{rest}" if rest else ""
        else:
            module = _KOHYA_NAMES.get(module, "")
    if module.startswith("sformer_blocks."):  # an alias some ai-toolkit exports use
        module = "transformer_blocks." + module[len("sformer_blocks.") :]
    match = _BFL_BLOCK.match(module)
    if match:
        table = _BFL_DOUBLE if match["kind"] == "double_blocks" else _BFL_SINGLE
        targets = table.get(match["rest"])
        if targets is None:
            return None
        block = "transformer_blocks" if match["kind"] == "double_blocks" else "single_transformer_blocks"
        return tuple(f"{block}.{match['index']}.{t}" for t in targets)
    if module in _BFL_OTHER:
        return (_BFL_OTHER[module],)
    if module.startswith(_DIFFUSERS_TOP):
        return (module,)
    return None


def bfl_module(module: str) -> tuple[str, int, int] | None:
    """The BFL module a diffusers module belongs to, its place among the modules fused there and how many are fused
    (`transformer_blocks.0.attn.to_k` -> ("double_blocks.0.img_attn.qkv", 1, 3)); None when BFL has no such module.
    The inverse of the tables above, so writing BFL names and reading them cannot disagree."""
    for prefix, kind, table in (
        ("transformer_blocks.", "double_blocks", _BFL_DOUBLE),
        ("single_transformer_blocks.", "single_blocks", _BFL_SINGLE),
    ):
        if module.startswith(prefix):
            index, _, rest = module[len(prefix) :].partition(".")
            for name, targets in table.items():
                if index.isdigit() and rest in targets:
                    return f"{kind}.{index}.{name}", targets.index(rest), len(targets)
            return None
    for name, target in _BFL_OTHER.items():
        if module == target:
            return name, 0, 1
    return None


# ---- scale ------------------------------------------------------------------------------------------------------


def _adapter_alpha(metadata: Mapping[str, str], label: str) -> tuple[float | None, bool, dict[str, float]]:
    """(lora_alpha, use_rslora, alpha_pattern) from diffusers' `lora_adapter_metadata` header, if there is one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False, {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise LoraFormatError(f"{label}: lora_adapter_metadata is not JSON: {exc}") from exc
    config = {k.removeprefix(COMPONENT_PREFIX): v for k, v in config.items()} if isinstance(config, dict) else {}
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    return (
        float(alpha) if isinstance(alpha, int | float) else None,
        bool(config.get("use_rslora")),
        {str(k): float(v) for k, v in pattern.items()} if isinstance(pattern, dict) else {},
    )


def _pattern_value(module: str, pattern: Mapping[str, float]) -> float | None:
    for key, value in pattern.items():  # peft matches a pattern key against the end of the module name
        if module == key or module.endswith("." + key):
            return value
    return None


# ---- reading ----------------------------------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str], label: str | None = None) -> LoraFile:
    """Read a LoRA safetensors file (any supported format) into the normal form, without copying its tensors."""
    tensors, metadata = read_safetensors(path)
    return normalise(tensors, metadata, label or str(path))


def normalise_torch(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], label: str) -> LoraFile:
    """`normalise` for a torch state dict (a LoRA already in memory)."""
    return normalise({key: Stored.from_torch(tensor) for key, tensor in state.items()}, metadata, label)


def normalise(tensors: Mapping[str, Stored], metadata: Mapping[str, str], label: str) -> LoraFile:
    """The normal form of a LoRA's tensors; LoraFormatError names the first key it cannot place."""
    groups: dict[tuple[str, str], dict[str, tuple[str, Stored]]] = {}
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        parsed = _split_key(key)
        if parsed is None:
            raise LoraFormatError(
                f"{label}: {key} is not a LoRA key this reader supports (lora_A/lora_B, lora_down/lora_up, alpha; "
                "LoKr, LoHa and DoRA weights are not supported)"
            )
        fmt, module, role, adapter = parsed
        if adapter:
            adapters.add(adapter)
        groups.setdefault((fmt, module), {})[role] = (key, tensor)
    if len(adapters) > 1:
        raise LoraFormatError(f"{label}: holds several peft adapters ({sorted(adapters)}); save one per file")
    if not groups:
        raise LoraFormatError(f"{label}: holds no LoRA weights")
    formats = sorted({fmt for fmt, _ in groups})
    file_alpha, rslora, alpha_pattern = _adapter_alpha(metadata, label)

    layers: dict[str, Factors] = {}
    keys: dict[str, str] = {}
    for (fmt, module), parts in groups.items():
        if "A" not in parts or "B" not in parts:
            have, missing = ("A", "B") if "A" in parts else ("B", "A")
            present = parts.get(have, parts.get("alpha"))
            assert present is not None
            raise LoraFormatError(f"{label}: {present[0]} has no matching lora_{missing} weight")
        key_a, A = parts["A"]
        key_b, B = parts["B"]
        if len(A.shape) != 2 or len(B.shape) != 2:
            raise LoraFormatError(f"{label}: {key_a}: klein LoRAs are linear (2-D factors), not {len(A.shape)}-D")
        if A.shape[0] != B.shape[1]:
            raise LoraFormatError(
                f"{label}: {key_a} has rank {A.shape[0]} but {key_b} has rank {B.shape[1]}: not one LoRA"
            )
        if A.dtype not in FLOATS or B.dtype not in FLOATS:
            raise LoraFormatError(f"{label}: {key_a}: LoRA factors must be floating point")
        targets = _diffusers_modules(fmt, module)
        if targets is None:
            raise LoraFormatError(f"{label}: {key_a} names no module of a FLUX.2 [klein] transformer")
        scale = _scale(parts, module, targets, A.shape[0], file_alpha, rslora, alpha_pattern, label)
        if B.shape[0] % len(targets):
            raise LoraFormatError(f"{label}: {key_b}: a fused projection of {B.shape[0]} rows does not split in 3")
        rows = B.shape[0] // len(targets)
        for index, target in enumerate(targets):
            if target in layers:
                raise LoraFormatError(f"{label}: {key_a} and {keys[target]} both update {target}")
            layers[target] = Factors(A, B.rows(index * rows, (index + 1) * rows), scale)
            keys[target] = key_a
    return LoraFile(label, layers, keys, "+".join(formats), dict(metadata))


def _scale(
    parts: Mapping[str, tuple[str, Stored]],
    module: str,
    targets: Sequence[str],
    rank: int,
    file_alpha: float | None,
    rslora: bool,
    alpha_pattern: Mapping[str, float],
    label: str,
) -> float:
    if "alpha" in parts:
        key, stored = parts["alpha"]
        if stored.data.size != 1 or stored.dtype not in (*FLOATS, "I64", "I32"):
            raise LoraFormatError(f"{label}: {key} must be a single number")
        value = stored.float32() if stored.dtype in FLOATS else stored.data
        return float(value.reshape(())) / rank
    alpha = _pattern_value(targets[0], alpha_pattern)
    if alpha is None:
        alpha = _pattern_value(module, alpha_pattern)
    if alpha is None:
        alpha = file_alpha
    if alpha is None:
        return 1.0
    # peft: lora_alpha / r, r being this module's rank (rank_pattern included), or / sqrt(r) with rsLoRA
    return alpha / (rank**0.5 if rslora else rank)


# ---- compatibility ----------------------------------------------------------------------------------------------

KNOWN_LAYOUTS: dict[str, dict[str, tuple[int, int]]] = {
    name: block_linear_shapes(**config) for name, config in KLEIN_SIZES.items()
}
# Metadata keys that name a base model; two files that both carry one must agree on it.
BASE_KEYS = ("kleinstyle.base", "modelspec.architecture", "ss_base_model_version")


@dataclass(frozen=True)
class Compatibility:
    base: str | None  # the klein size the layers' shapes identify, None when they match none (e.g. a test model)
    layers: tuple[str, ...]  # every module some input updates, in a stable order
    partial: dict[str, tuple[str, ...]]  # module -> labels of the inputs that lack it (their update there is zero)


def identify_base(lora: LoraFile) -> str | None:
    """The known klein size whose block linears hold every block layer of `lora` with its shape, if any."""
    blocks = {m: f.shape for m, f in lora.layers.items() if m.startswith(BLOCK_PREFIXES)}
    for name, layout in KNOWN_LAYOUTS.items():
        if blocks and all(layout.get(m) == shape for m, shape in blocks.items()):
            return name
    return None


def check_compatible(loras: Sequence[LoraFile]) -> Compatibility:
    """Refuse LoRAs that cannot be summed, naming the first key that does not fit; else say what they cover.

    Refused: different base models declared in metadata; layers whose shapes identify different klein sizes, or a
    layer a file's identified base does not have; the same layer with different shapes in two files. A layer some
    inputs lack is not refused: those inputs do not change it (a LoRA trained on single blocks fused with one
    trained on all), and the result lists such layers.
    """
    for key in BASE_KEYS:
        declared = [(lora.label, lora.metadata[key]) for lora in loras if lora.metadata.get(key)]
        if len({value for _, value in declared}) > 1:
            (first, a), (second, b) = declared[0], next(d for d in declared if d[1] != declared[0][1])
            raise IncompatibleLoras(
                f"{second}: metadata {key}={b!r} but {first} has {key}={a!r}: LoRAs for different base models"
            )
    bases = [identify_base(lora) for lora in loras]
    known = next(((lora, base) for lora, base in zip(loras, bases, strict=True) if base), None)
    base = known[1] if known else None
    if known:
        reference, layout = known[0], KNOWN_LAYOUTS[known[1]]
        for lora in loras:
            for module, factors in lora.layers.items():
                expected = layout.get(module)
                if module.startswith(BLOCK_PREFIXES) and expected != factors.shape:
                    has = f"has it as {_shape(expected)}" if expected else "has no such layer"
                    raise IncompatibleLoras(
                        f"{lora.label}: {lora.keys[module]} ({module}) is {_shape(factors.shape)}, but {base}, "
                        f"the base model of {reference.label}, {has}"
                    )
    shapes: dict[str, tuple[tuple[int, int], LoraFile]] = {}
    for lora in loras:
        for module, factors in lora.layers.items():
            seen = shapes.setdefault(module, (factors.shape, lora))
            if seen[0] != factors.shape:
                raise IncompatibleLoras(
                    f"{lora.label}: {lora.keys[module]} ({module}) is {_shape(factors.shape)} but "
                    f"{seen[1].label} has {_shape(seen[0])} for it: LoRAs for different base models"
                )
    layers = tuple(sorted(shapes, key=_module_order))
    partial = {
        module: tuple(lora.label for lora in loras if module not in lora.layers)
        for module in layers
        if any(module not in lora.layers for lora in loras)
    }
    return Compatibility(base, layers, partial)


def _shape(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _module_order(module: str) -> tuple[tuple[int, int, str], ...]:
    """Blocks in numeric order (transformer_blocks.2 before transformer_blocks.10), then by name."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module.split("."))
