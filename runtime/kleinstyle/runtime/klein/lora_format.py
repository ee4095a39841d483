"""The LoRA file formats kleinstyle publishes for FLUX.2 [klein] (docs/lora-formats.md).

Format `klein-diffusers-v1` (StyleLoRA `spec.output.loraFormats: [diffusers]`, the default; what the builtin backend's
checkpoints hold):
- a safetensors file whose keys are diffusers/peft names with the pipeline-component prefix:
  `transformer.<diffusers module name>.lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank), for example
  `transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj.lora_A.weight`;
- the training scale alpha / rank is **baked into lora_B**, so the update is exactly `B @ A` (alpha = rank,
  scale 1.0). That is the convention ai-toolkit's Klein LoRAs already follow (docs/facts.md#ai-toolkit: it ignores
  `linear_alpha`), and the one every loader assumes when a file carries no alpha: diffusers'
  `Flux2KleinPipeline.load_lora_weights` infers rank from the shapes and sets alpha = rank. No `.alpha` keys.
- string metadata in the safetensors header: `format=pt` plus `kleinstyle.*` keys (format name, rank, the alpha
  that was baked in, step, base architecture) for humans and the artifact store; loaders ignore them.

Format `klein-bfl-v1` (`loraFormats: [bfl]`): the same update under BFL names, as ai-toolkit writes them and
ComfyUI's own checkpoints name the weights: `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight`, e.g.
`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, `diffusion_model.single_blocks.3.linear1.lora_B.weight`.
BFL fuses a double block's q, k and v into one linear (`img_attn.qkv`, `txt_attn.qkv`: rows q, then k, then v), so
the three diffusers LoRAs become one, exactly: when q, k and v share one lora_A (the builtin trainer's default,
ai-toolkit's layout) lora_A is kept and the lora_B stacked by rows (same rank); otherwise the lora_A are stacked
and lora_B is block-diagonal (rank the sum of theirs, zero elsewhere), so B @ A is, row block by row block, each
projection's own B_i @ A_i. A projection the LoRA does not train is a zero row block. Alpha stays baked in; the
module names come from `lora_io`'s BFL tables, the ones it reads BFL files with.

Both load in ComfyUI without a key left over, on the tiny klein and on the real 9B layout: run, not read (ComfyUI
v0.10.0, commit 79cdbc81; the command and the result are in docs/lora-formats.md). Its Flux branch of
`model_lora_keys_unet` (Flux2 subclasses Flux) maps `transformer.<diffusers name>` through
`comfy.utils.flux_to_diffusers` (to_q/to_k/to_v onto the fused qkv weight by row offsets, `attn.to_qkv_mlp_proj`
onto `linear1`) and every `diffusion_model.<name>` onto the weight of that name; no alpha means scale 1.0.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:  # fusion reads the names below without torch; only the conversion needs it
    import torch

    from .lora_io import Factors, LoraFile
    from .tensorfile import Stored

FORMAT_NAME = "klein-diffusers-v1"
COMPONENT_PREFIX = "transformer."
BFL_FORMAT_NAME = "klein-bfl-v1"
BFL_PREFIX = "diffusion_model."

# The values of the option (StyleLoRA spec.output.loraFormats, TrainSpec.lora_formats) and the format each names.
LoraFormatOption = Literal["diffusers", "bfl"]
FORMATS: Final[dict[str, str]] = {"diffusers": FORMAT_NAME, "bfl": BFL_FORMAT_NAME}
_KEY_PREFIX = {"diffusers": COMPONENT_PREFIX, "bfl": BFL_PREFIX}


def to_artifact_state_dict(
    peft_state: Mapping[str, torch.Tensor], *, rank: int, alpha: float, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Turn peft's adapter state dict (keys without adapter name, as `get_peft_model_state_dict` returns) into
    the published key set: prefix the component and fold alpha / rank into lora_B (float32 unless `dtype`)."""
    import torch

    dtype = dtype or torch.float32
    scale = alpha / rank
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"unexpected key in a LoRA state dict: {key}")
        value = tensor.detach().to("cpu", torch.float32)
        if ".lora_B." in key and scale != 1.0:
            value = value * scale
        # A copy of its own: lora_A shared by q, k and v (lora_train.share_qkv_down) is one tensor under three keys.
        out[COMPONENT_PREFIX + key] = value.to(dtype).clone(memory_format=torch.contiguous_format)
    return out


# ---- export: one LoRA in either published format -----------------------------------------------------------------
# These import lora_io and tensorfile when called: lora_io imports the names above.


def diffusers_tensors(lora: LoraFile) -> dict[str, Stored]:
    """`lora` (any format lora_io reads) under `klein-diffusers-v1` keys, its scale folded into lora_B."""
    out: dict[str, Stored] = {}
    for module, factors in lora.layers.items():
        out[f"{COMPONENT_PREFIX}{module}.lora_A.weight"] = factors.A
        out[f"{COMPONENT_PREFIX}{module}.lora_B.weight"] = _scaled_b(factors)
    return out


def bfl_tensors(lora: LoraFile) -> dict[str, Stored]:
    """`lora` under `klein-bfl-v1` keys: fused projections made exactly (see the module's docstring), the scale
    folded into lora_B. LoraFormatError names a module BFL has no name for."""
    import numpy as np

    from .lora_io import LoraFormatError, bfl_module
    from .tensorfile import Stored

    groups: dict[str, tuple[int, dict[int, Factors]]] = {}
    for module, factors in lora.layers.items():
        found = bfl_module(module)
        if found is None:
            raise LoraFormatError(f"{lora.label}: {module} has no BFL name (not a FLUX.2 [klein] linear)")
        name, index, parts = found
        groups.setdefault(name, (parts, {}))[1][index] = factors
    out: dict[str, Stored] = {}
    for name in sorted(groups, key=_natural):
        parts, members = groups[name]
        if parts == 1:
            A, B = members[0].A, _scaled_b(members[0])
        else:
            present = [members[i] for i in sorted(members)]
            rows = {f.shape[0] for f in present}
            if len(rows) != 1:
                raise LoraFormatError(f"{lora.label}: the projections fused in {name} differ in size ({sorted(rows)})")
            (out_rows,) = rows
            dtype = _common_dtype(present)
            first = present[0]
            if all(_same(f.A, first.A) for f in present):  # one lora_A: stack the lora_B by rows, same rank
                b = np.zeros((parts * out_rows, first.rank), np.float32)
                for i, f in members.items():
                    b[i * out_rows : (i + 1) * out_rows] = f.B.float32() * np.float32(f.scale)
                A = first.A if first.A.dtype == dtype else Stored.from_float32(first.A.float32(), dtype)
            else:  # stacked lora_A, block-diagonal lora_B: each row block sees only its own columns
                ranks = [members[i].rank if i in members else 0 for i in range(parts)]
                a = np.zeros((sum(ranks), first.shape[1]), np.float32)
                b = np.zeros((parts * out_rows, sum(ranks)), np.float32)
                col = 0
                for i in range(parts):
                    if i in members:
                        f = members[i]
                        a[col : col + f.rank] = f.A.float32()
                        b[i * out_rows : (i + 1) * out_rows, col : col + f.rank] = f.B.float32() * np.float32(f.scale)
                        col += f.rank
                A = Stored.from_float32(a, dtype)
            B = Stored.from_float32(b, dtype)
        out[f"{BFL_PREFIX}{name}.lora_A.weight"] = A
        out[f"{BFL_PREFIX}{name}.lora_B.weight"] = B
    return out


def export_lora(source: str | os.PathLike[str], dest: str | os.PathLike[str], option: str) -> str:
    """Write the LoRA file `source` (any format lora_io reads) to `dest` in the published format `option` names
    ("diffusers" or "bfl"); return that format's name. A file already in it (its keys all of that style, no alpha
    to fold) is copied byte for byte; any other is converted exactly, keeping its `kleinstyle.*` metadata."""
    from .lora_io import normalise
    from .tensorfile import read_safetensors, write_safetensors

    if option not in FORMATS:
        raise ValueError(f"unknown LoRA format {option!r}: one of {sorted(FORMATS)}")
    tensors, metadata = read_safetensors(source)
    prefix = _KEY_PREFIX[option]
    if (
        tensors
        and "lora_adapter_metadata" not in metadata
        and all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    ):
        shutil.copyfile(source, dest)
        return FORMATS[option]
    lora = normalise(tensors, metadata, str(source))
    out = bfl_tensors(lora) if option == "bfl" else diffusers_tensors(lora)
    header = {k: v for k, v in metadata.items() if k.startswith("kleinstyle.")}
    write_safetensors(dest, out, {"format": "pt", **header, "kleinstyle.format": FORMATS[option]})
    return FORMATS[option]


def _scaled_b(factors: Factors) -> Stored:
    import numpy as np

    from .tensorfile import Stored

    if factors.scale == 1.0:
        return factors.B
    return Stored.from_float32(factors.B.float32() * np.float32(factors.scale), factors.B.dtype)


def _same(a: Stored, b: Stored) -> bool:
    import numpy as np

    return a.data is b.data or (a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a.data, b.data)))


def _common_dtype(members: list[Factors]) -> str:
    dtypes = {t.dtype for f in members for t in (f.A, f.B)}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def _natural(name: str) -> tuple[tuple[int, int, str], ...]:
    """double_blocks.2 before double_blocks.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
