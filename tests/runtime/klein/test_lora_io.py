"""Reading LoRAs in every format klein LoRAs come in, and refusing the ones that do not fit together.

The reader's answers are checked against diffusers' own Flux2 conversions (what `load_lora_weights` does), and the
zero-copy safetensors I/O against the safetensors library, both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux2_lora_to_diffusers,
    _convert_non_diffusers_flux2_lora_to_diffusers,
)
from kleinstyle.runtime.klein.arch import KLEIN_SIZES, block_linear_shapes, lora_linear_names
from kleinstyle.runtime.klein.lora_io import (
    IncompatibleLoras,
    LoraFormatError,
    check_compatible,
    identify_base,
    normalise_torch,
    read_lora,
)
from kleinstyle.runtime.klein.tensorfile import (
    SafetensorsWriter,
    Stored,
    TensorFileError,
    read_safetensors,
    write_safetensors,
)
from safetensors.torch import load_file, save_file

# The tiny klein's shapes: 2 double + 2 single blocks, 2 heads x 16, mlp_ratio 3.
TINY = {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "mlp_ratio": 3.0}
TINY_SHAPES = block_linear_shapes(**TINY)
QKV = {"img_attn": ("to_q", "to_k", "to_v"), "txt_attn": ("add_q_proj", "add_k_proj", "add_v_proj")}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype=torch.float32) -> dict:
    """An artifact-format state dict (`transformer.<module>.lora_A/B.weight`) over `shapes`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (rows, cols) in shapes.items():
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g).to(dtype)
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g).to(dtype)
    return out


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A in float64 for a diffusers-keyed state dict."""
    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")].double()
            out[module] = b @ state[key].double()
    return out


def test_the_shape_table_matches_diffusers_models_built_on_the_meta_device():
    from diffusers import Flux2Transformer2DModel

    for config in (TINY, KLEIN_SIZES["klein-9b"], KLEIN_SIZES["klein-4b"]):
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**config, in_channels=16, joint_attention_dim=96, axes_dims_rope=(4,) * 4)
        modules = dict(model.named_modules())
        real = {name: tuple(modules[name].weight.shape) for name in lora_linear_names(model)}
        assert block_linear_shapes(**config) == real


# ---- safetensors without copies ---------------------------------------------------------------------------------


def test_files_written_here_load_in_safetensors_and_back(tmp_path: Path):
    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor(2.5),
        "d": torch.empty(0, 4),
        "e": torch.randn(2, 3).half(),
    }
    write_safetensors(tmp_path / "mine.safetensors", {n: Stored.from_torch(t) for n, t in tensors.items()}, {"k": "v"})
    theirs = load_file(tmp_path / "mine.safetensors")
    assert all(torch.equal(theirs[name], tensor) for name, tensor in tensors.items())

    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    mine, metadata = read_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"format": "pt"} and set(mine) == set(tensors)
    for name, tensor in tensors.items():
        back = mine[name].to_torch()
        assert torch.equal(back, tensor) and back.dtype == tensor.dtype, name
    assert read_safetensors(tmp_path / "mine.safetensors")[1] == {"k": "v"}
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_a_streamed_file_is_valid_in_any_order_and_with_a_header_bigger_than_reserved(tmp_path: Path):
    tensors = {f"t{i}": Stored.from_torch(torch.randn(4, i + 1).bfloat16()) for i in range(5)}
    for reserve in (1 << 12, 8):  # room to spare; far too little, so the file is written again behind its header
        path = tmp_path / f"streamed-{reserve}.safetensors"
        with SafetensorsWriter(path, reserve) as writer:
            for name in reversed(tensors):  # as layers finish, not in name order
                writer.add(name, tensors[name])
            writer.commit({"note": "x" * 100})
        loaded = load_file(path)
        assert all(torch.equal(loaded[n], t.to_torch()) for n, t in tensors.items())
        assert read_safetensors(path)[1] == {"note": "x" * 100}
    with SafetensorsWriter(tmp_path / "abandoned.safetensors") as writer:
        writer.add("t0", tensors["t0"])  # no commit: nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed-4096.safetensors", "streamed-8.safetensors"]


def test_a_broken_file_is_refused_with_its_name(tmp_path: Path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(TensorFileError, match=r"broken.safetensors.*not JSON"):
        read_safetensors(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)  # 8 of the 16 bytes
    with pytest.raises(TensorFileError, match="w: byte range"):
        read_safetensors(path)


# ---- formats ----------------------------------------------------------------------------------------------------


def _bfl_from_diffusers(state: dict[str, torch.Tensor], fused_a: dict[tuple[int, str], torch.Tensor]) -> dict:
    """The same update in ai-toolkit/BFL keys: per double block a fused qkv with one shared A."""
    out = {}
    names = {
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0",
        "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0",
        "ff_context.linear_out": "txt_mlp.2",
    }
    for block in range(TINY["num_layers"]):
        pre = f"transformer.transformer_blocks.{block}."
        for attn, projections in QKV.items():
            out[f"diffusion_model.double_blocks.{block}.{attn}.qkv.lora_A.weight"] = fused_a[block, attn]
            out[f"diffusion_model.double_blocks.{block}.{attn}.qkv.lora_B.weight"] = torch.cat(
                [state[f"{pre}attn.{p}.lora_B.weight"] for p in projections]
            )
        for diffusers_name, bfl in names.items():
            for ab in ("A", "B"):
                out[f"diffusion_model.double_blocks.{block}.{bfl}.lora_{ab}.weight"] = state[
                    f"{pre}{diffusers_name}.lora_{ab}.weight"
                ]
    for block in range(TINY["num_single_layers"]):
        pre = f"transformer.single_transformer_blocks.{block}.attn."
        for diffusers_name, bfl in (("to_qkv_mlp_proj", "linear1"), ("to_out", "linear2")):
            for ab in ("A", "B"):
                out[f"diffusion_model.single_blocks.{block}.{bfl}.lora_{ab}.weight"] = state[
                    f"{pre}{diffusers_name}.lora_{ab}.weight"
                ]
    return out


def _shared_a_lora(seed: int) -> tuple[dict[str, torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
    """A diffusers-keyed LoRA whose q, k, v (and add_q, add_k, add_v) share A, as a split BFL LoRA does."""
    state = random_lora(TINY_SHAPES, 4, seed)
    g = torch.Generator().manual_seed(seed + 100)
    fused = {}
    for block in range(TINY["num_layers"]):
        for attn, projections in QKV.items():
            fused[block, attn] = torch.randn(4, 32, generator=g)
            for p in projections:
                state[f"transformer.transformer_blocks.{block}.attn.{p}.lora_A.weight"] = fused[block, attn]
    return state, fused


def test_ai_toolkit_bfl_keys_read_as_diffusers_reads_them(tmp_path: Path):
    state, fused = _shared_a_lora(1)
    bfl = _bfl_from_diffusers(state, fused)
    save_file(bfl, tmp_path / "bfl.safetensors")
    lora = read_lora(tmp_path / "bfl.safetensors")
    assert lora.format == "bfl" and set(lora.layers) == set(TINY_SHAPES)
    theirs = _convert_non_diffusers_flux2_lora_to_diffusers(dict(bfl))
    assert set(lora.state_dict()) == set(theirs)
    for key, tensor in lora.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
    # The fused qkv's A is shared: the three split layers view the file, no copy each.
    q, v = lora.layers["transformer_blocks.0.attn.to_q"], lora.layers["transformer_blocks.0.attn.to_v"]
    assert q.A.data is v.A.data and np.shares_memory(q.B.data.base, v.B.data.base)


def test_lora_down_up_spellings_of_bfl_keys_are_the_same_lora(tmp_path: Path):
    state, fused = _shared_a_lora(2)
    bfl = {
        k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
        for k, v in _bfl_from_diffusers(state, fused).items()
    }
    save_file(bfl, tmp_path / "down-up.safetensors")
    mine = deltas(read_lora(tmp_path / "down-up.safetensors").state_dict())
    assert all(torch.allclose(mine[m], d) for m, d in deltas(state).items())


def test_kohya_keys_with_alpha_match_diffusers_conversion(tmp_path: Path):
    state, fused = _shared_a_lora(3)
    kohya = {}
    for key, tensor in _bfl_from_diffusers(state, fused).items():
        module, _, ab = key.removeprefix("diffusion_model.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(2.0)  # rank 4: scale 0.5
    save_file(kohya, tmp_path / "kohya.safetensors")
    lora = read_lora(tmp_path / "kohya.safetensors")
    assert lora.format == "kohya" and {f.scale for f in lora.layers.values()} == {0.5}
    theirs = deltas(_convert_kohya_flux2_lora_to_diffusers(dict(kohya)))
    mine = deltas(lora.state_dict())
    assert set(mine) == set(theirs)
    assert all(torch.allclose(mine[m], theirs[m], atol=1e-5) for m in mine)
    assert all(torch.allclose(mine[m], 0.5 * d) for m, d in deltas(state).items())


def test_peft_keys_and_diffusers_adapter_metadata_give_the_scale():
    state = random_lora(TINY_SHAPES, 4, 4)
    peft = {
        k.replace("transformer.", "base_model.model.").replace(".weight", ".default.weight"): v
        for k, v in state.items()
    }
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    lora = normalise_torch(peft, meta, "peft.safetensors")
    assert lora.format == "peft" and {f.scale for f in lora.layers.values()} == {2.0}
    assert all(torch.allclose(deltas(lora.state_dict())[m], 2 * d) for m, d in deltas(state).items())
    # kleinstyle's own artifacts bake alpha in: scale 1, the tensors are the file's.
    artifact = normalise_torch(state, {"kleinstyle.format": "klein-diffusers-v1"}, "artifact")
    assert artifact.format == "diffusers" and {f.scale for f in artifact.layers.values()} == {1.0}
    assert artifact.max_rank == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"transformer.x_embedder.lokr_w1": torch.ones(2, 2)}), "lokr_w1 is not a LoRA key"),
        (
            lambda s: s.pop("transformer.transformer_blocks.0.attn.to_q.lora_B.weight"),
            "to_q.lora_A.weight has no matching lora_B",
        ),
        (
            lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 3)}),
            "to_q.lora_A.weight has rank 4 but .*lora_B.weight has rank 3",
        ),
        (
            lambda s: (
                s.update({"transformer.unet.down.lora_A.weight": torch.ones(2, 2)})
                or s.update({"transformer.unet.down.lora_B.weight": torch.ones(2, 2)})
            ),
            "unet.down.lora_A.weight names no module of a FLUX.2",
        ),
    ],
)
def test_what_is_not_a_klein_lora_is_refused_naming_the_key(change, message):
    state = random_lora(TINY_SHAPES, 4, 5)
    change(state)
    with pytest.raises(LoraFormatError, match=message):
        normalise_torch(state, {}, "bad.safetensors")


# ---- fitting together -------------------------------------------------------------------------------------------


def _sized(size: str, modules: list[str], rank: int = 1) -> dict:
    """A rank-1 LoRA over some layers of a real klein size (cheap: a 9B layer's factors are only 4096 x 1)."""
    layout = block_linear_shapes(**KLEIN_SIZES[size])
    return random_lora({m: layout[m] for m in modules}, rank, 0)


def test_loras_for_different_base_models_are_refused_naming_the_first_key():
    nine = normalise_torch(_sized("klein-9b", ["transformer_blocks.0.attn.to_q"]), {}, "nine.safetensors")
    four = normalise_torch(_sized("klein-4b", ["transformer_blocks.0.attn.to_q"]), {}, "four.safetensors")
    assert (identify_base(nine), identify_base(four)) == ("klein-9b", "klein-4b")
    with pytest.raises(IncompatibleLoras) as refused:
        check_compatible([nine, four])
    message = str(refused.value)
    assert message.startswith("four.safetensors: transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
    assert "3072x3072" in message and "klein-9b" in message and "4096x4096" in message


def test_a_layer_the_base_model_lacks_is_refused():
    nine = normalise_torch(_sized("klein-9b", ["single_transformer_blocks.23.attn.to_out"]), {}, "nine.safetensors")
    extra = _sized("klein-9b", ["single_transformer_blocks.0.attn.to_out"])
    extra = {k.replace("single_transformer_blocks.0.", "single_transformer_blocks.24."): v for k, v in extra.items()}
    with pytest.raises(IncompatibleLoras, match=r"blocks\.24\.attn\.to_out.* klein-9b, the base model of nine"):
        check_compatible([nine, normalise_torch(extra, {}, "flux1.safetensors")])


def test_a_shape_mismatch_between_unknown_bases_is_refused_naming_the_key():
    tiny = normalise_torch(random_lora(TINY_SHAPES, 4, 0), {}, "tiny.safetensors")
    wider = dict(TINY_SHAPES, **{"transformer_blocks.1.ff.linear_out": (32, 128)})
    other = normalise_torch(random_lora(wider, 4, 1), {}, "other.safetensors")
    with pytest.raises(IncompatibleLoras, match=r"other.safetensors: .*blocks.1.ff.linear_out.* 32x128 but tiny"):
        check_compatible([tiny, other])


def test_declared_base_models_must_agree():
    state = random_lora(TINY_SHAPES, 4, 0)
    a = normalise_torch(state, {"modelspec.architecture": "flux-2-klein-9b"}, "a")
    b = normalise_torch(state, {"modelspec.architecture": "flux-1-dev"}, "b")
    with pytest.raises(IncompatibleLoras, match=r"b: metadata modelspec.architecture='flux-1-dev'"):
        check_compatible([a, b])


def test_a_lora_on_fewer_layers_fits_and_the_gap_is_reported():
    everything = normalise_torch(random_lora(TINY_SHAPES, 4, 0), {}, "all")
    single = {m: s for m, s in TINY_SHAPES.items() if m.startswith("single_")}
    style = normalise_torch(random_lora(single, 8, 1), {}, "single")
    compat = check_compatible([everything, style])
    assert compat.base is None and len(compat.layers) == len(TINY_SHAPES)
    assert compat.partial and all(labels == ("single",) for labels in compat.partial.values())
    assert set(compat.partial) == set(TINY_SHAPES) - set(single)
