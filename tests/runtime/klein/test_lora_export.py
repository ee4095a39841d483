"""The BFL/ComfyUI export (`klein-bfl-v1`): the same update as the diffusers file, under BFL names, exactly.

Every check compares dense updates B @ A module by module: the file's own reader (lora_io) and diffusers' own Flux2
conversion, which shares no table with kleinstyle, must both read the export back to the deltas it was made from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
from kleinstyle.runtime.klein import lora_io
from kleinstyle.runtime.klein.arch import KLEIN_SIZES, block_linear_shapes
from kleinstyle.runtime.klein.lora_format import (
    BFL_FORMAT_NAME,
    FORMAT_NAME,
    bfl_tensors,
    export_lora,
)
from kleinstyle.runtime.klein.lora_io import check_compatible, normalise_torch, read_lora
from kleinstyle.runtime.klein.tensorfile import read_safetensors
from safetensors.torch import load_file, save_file

from .test_lora_io import QKV, TINY, TINY_SHAPES, deltas, random_lora

HEADER = {"format": "pt", "kleinstyle.format": FORMAT_NAME, "kleinstyle.rank": "4", "kleinstyle.step": "6"}


def shared_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with q, k and v (add_q, add_k, add_v) of each double block sharing the first one's lora_A, as the
    builtin trainer writes them (lora_train.share_qkv_down)."""
    out = dict(state)
    for block in range(TINY["num_layers"]):
        for projections in QKV.values():
            first = out[f"transformer.transformer_blocks.{block}.attn.{projections[0]}.lora_A.weight"]
            for p in projections:
                out[f"transformer.transformer_blocks.{block}.attn.{p}.lora_A.weight"] = first.clone()
    return out


def same_deltas(mine: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return set(mine) == set(expected) and all(
        torch.allclose(mine[m], expected[m], rtol=1e-5, atol=1e-6) for m in expected
    )


def export(tmp_path: Path, state: dict[str, torch.Tensor], option: str, name: str = "lora") -> Path:
    source, dest = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.{option}.safetensors"
    save_file(state, source, metadata=HEADER)
    assert export_lora(source, dest, option) == (BFL_FORMAT_NAME if option == "bfl" else FORMAT_NAME)
    return dest


@pytest.mark.parametrize("shared", [False, True], ids=["own-lora_A", "shared-lora_A"])
def test_the_bfl_export_reads_back_to_every_modules_delta(tmp_path: Path, shared: bool) -> None:
    state = random_lora(TINY_SHAPES, 4, seed=3)
    state = shared_qkv(state) if shared else state
    bfl = load_file(export(tmp_path, state, "bfl"))

    assert all(k.startswith("diffusion_model.") for k in bfl)
    fused = bfl["diffusion_model.double_blocks.1.txt_attn.qkv.lora_A.weight"]
    # one shared lora_A stays rank 4; three own ones stack to rank 12 with a block-diagonal lora_B
    assert fused.shape == ((4, 32) if shared else (12, 32))
    assert bfl["diffusion_model.double_blocks.1.txt_attn.qkv.lora_B.weight"].shape == ((96, 4) if shared else (96, 12))
    assert "diffusion_model.single_blocks.0.linear1.lora_A.weight" in bfl
    assert len(bfl) == 2 * (TINY["num_layers"] * 8 + TINY["num_single_layers"] * 2)

    expected = deltas(state)
    assert same_deltas(deltas(read_lora(tmp_path / "lora.bfl.safetensors").state_dict()), expected)
    # diffusers' own BFL reader, which shares no table with kleinstyle, reads the same update
    assert same_deltas(deltas(_convert_non_diffusers_flux2_lora_to_diffusers(dict(bfl))), expected)
    metadata = read_safetensors(tmp_path / "lora.bfl.safetensors")[1]
    assert metadata == {**HEADER, "kleinstyle.format": BFL_FORMAT_NAME}


def test_swapped_q_and_k_would_be_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is sharp enough to see a wrong mapping: q written where k goes fails it."""
    real = lora_io.bfl_module

    def swapped(module: str) -> tuple[str, int, int] | None:
        found = real(module)
        if found and found[0].endswith("img_attn.qkv") and found[1] in (0, 1):
            return found[0], 1 - found[1], found[2]
        return found

    state = random_lora(TINY_SHAPES, 4, seed=4)
    monkeypatch.setattr(lora_io, "bfl_module", swapped)
    bfl = load_file(export(tmp_path, state, "bfl"))
    assert not same_deltas(deltas(_convert_non_diffusers_flux2_lora_to_diffusers(dict(bfl))), deltas(state))
    assert not same_deltas(deltas(read_lora(tmp_path / "lora.bfl.safetensors").state_dict()), deltas(state))


def test_bfl_back_to_diffusers_and_a_scale_are_exact(tmp_path: Path) -> None:
    """An alpha that is not the rank (diffusers' adapter metadata) is folded into lora_B in both formats; a
    LoRA on some projections of a fused qkv only gets zero row blocks for the others."""
    state = {k: v for k, v in random_lora(TINY_SHAPES, 4, seed=5).items() if ".to_k." not in k}
    lora = normalise_torch(state, {"lora_adapter_metadata": '{"lora_alpha": 2, "r": 4}'}, "scaled")
    expected = {m: 0.5 * d for m, d in deltas(state).items()}
    tensors = bfl_tensors(lora)
    bfl = {k: t.to_torch() for k, t in tensors.items()}
    save_file(bfl, tmp_path / "scaled-bfl.safetensors")
    back = read_lora(tmp_path / "scaled-bfl.safetensors")
    zero = {m for m, f in back.layers.items() if not f.delta().any()}
    assert zero == {f"transformer_blocks.{b}.attn.to_k" for b in range(TINY["num_layers"])}
    assert same_deltas({m: d for m, d in deltas(back.state_dict()).items() if m not in zero}, expected)

    diffusers = export(tmp_path, bfl, "diffusers", name="scaled-bfl")
    assert same_deltas({m: d for m, d in deltas(load_file(diffusers)).items() if m not in zero}, expected)


def test_a_file_already_in_the_format_is_copied_byte_for_byte(tmp_path: Path) -> None:
    state = shared_qkv(random_lora(TINY_SHAPES, 4, seed=6))
    diffusers = export(tmp_path, state, "diffusers")
    assert diffusers.read_bytes() == (tmp_path / "lora.safetensors").read_bytes()
    bfl = export(tmp_path, state, "bfl")
    again = tmp_path / "again.safetensors"
    assert export_lora(bfl, again, "bfl") == BFL_FORMAT_NAME
    assert again.read_bytes() == bfl.read_bytes()
    # and generation/fusion take either: the two files are one LoRA to the compatibility check
    both = check_compatible([read_lora(diffusers), read_lora(bfl)])
    assert not both.partial and len(both.layers) == len(TINY_SHAPES)


def test_the_9b_layout_has_a_bfl_name_for_every_linear() -> None:
    shapes = block_linear_shapes(**KLEIN_SIZES["klein-9b"])
    assert len(shapes) == 8 * 12 + 24 * 2
    names = {m: lora_io.bfl_module(m) for m in shapes}
    assert all(names.values())
    fused = {n[0] for n in names.values() if n}
    assert len(fused) == 8 * 8 + 24 * 2  # q, k, v fused in each double block's img_attn.qkv and txt_attn.qkv
    assert names["transformer_blocks.7.attn.add_v_proj"] == ("double_blocks.7.txt_attn.qkv", 2, 3)
    assert names["single_transformer_blocks.23.attn.to_out"] == ("single_blocks.23.linear2", 0, 1)
    assert lora_io.bfl_module("transformer_blocks.0.attn.norm_q") is None


def test_a_module_bfl_cannot_name_is_refused(tmp_path: Path) -> None:
    lora = normalise_torch(random_lora({"transformer_blocks.0.attn.to_q": (32, 32)}, 2, seed=7), {}, "odd")
    lora.layers["transformer_blocks.0.attn.norm_q"] = lora.layers["transformer_blocks.0.attn.to_q"]
    with pytest.raises(lora_io.LoraFormatError, match="norm_q has no BFL name"):
        bfl_tensors(lora)
