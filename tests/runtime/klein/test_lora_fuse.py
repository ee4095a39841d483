"""Fusion is exact: checked against dense float64 arithmetic on small shapes, and K-LoRA's invariants hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kleinstyle.runtime.klein.lora_fuse import FusionError, Source, WeightsCancel, fuse, topk_abs_sum
from kleinstyle.runtime.klein.lora_io import Factors, IncompatibleLoras, LoraFile
from kleinstyle.runtime.klein.tensorfile import Stored

SHAPES = {
    "transformer_blocks.0.attn.to_q": (48, 40),
    "transformer_blocks.0.ff.linear_in": (96, 40),
    "single_transformer_blocks.0.attn.to_out": (40, 72),
}


def lora(label: str, rank: int, seed: int, *, scale: float = 1.0, shapes=SHAPES, decay: float = 0.0) -> LoraFile:
    """Random factors; `decay` > 0 gives each layer a decaying spectrum (as trained LoRAs have)."""
    g = np.random.default_rng(seed)
    layers = {}
    for module, (rows, cols) in shapes.items():
        spectrum = np.exp(-decay * np.arange(rank, dtype=np.float32))
        A, B = g.standard_normal((rank, cols), np.float32), g.standard_normal((rows, rank), np.float32) * spectrum
        layers[module] = factors(A, B, scale)
    return LoraFile(label, layers, {m: f"transformer.{m}.lora_A.weight" for m in layers}, "test")


def factors(A: np.ndarray, B: np.ndarray, scale: float = 1.0, dtype: str = "F32") -> Factors:
    return Factors(Stored.from_float32(A, dtype), Stored.from_float32(B, dtype), scale)


def weighted_sum(sources: list[Source], module: str) -> np.ndarray:
    return sum(s.weight * s.lora.layers[module].delta() for s in sources if module in s.lora.layers)


def delta(fused, module: str) -> np.ndarray:
    return fused.layers[module].factors.delta()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def top(dense: np.ndarray, k: int) -> np.ndarray:
    """The rank-k truncated SVD of `dense` and all its singular values."""
    U, S, Vh = np.linalg.svd(dense, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


SOURCES = [Source(lora("a", 4, 1), 1.0), Source(lora("b", 6, 2, scale=0.5), -0.7), Source(lora("c", 5, 3), 1.6)]


@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_svd_equals_the_dense_svd_truncation(rank: int):
    fused = fuse(SOURCES, "svd", rank=rank)
    for module in SHAPES:
        best, S = top(weighted_sum(SOURCES, module), rank)
        layer = fused.layers[module]
        assert layer.factors.rank == rank
        assert relative(delta(fused, module), best) < 1e-5
        assert layer.energy_kept == pytest.approx(float((S[:rank] ** 2).sum() / (S**2).sum()), rel=1e-6)


def test_svd_at_full_rank_reproduces_the_sum_and_keeps_all_energy():
    fused = fuse(SOURCES, "svd", rank=15)  # 4 + 6 + 5
    assert fused.energy_kept == pytest.approx(1.0)
    for module in SHAPES:
        assert relative(delta(fused, module), weighted_sum(SOURCES, module)) < 1e-6


def test_concat_is_the_weighted_sum_exactly_at_the_sum_of_ranks():
    """Exact up to one float32 rounding of each weighted B; with weight 1 the factors are the inputs' bits."""
    fused = fuse(SOURCES, "concat")
    assert fused.rank == 15 and fused.energy_kept == 1.0
    for module in SHAPES:
        assert relative(delta(fused, module), weighted_sum(SOURCES, module)) < 1e-7
    a, c = SOURCES[0].lora.layers, SOURCES[2].lora.layers
    plain = fuse([Source(SOURCES[0].lora), Source(SOURCES[2].lora)], "concat").layers
    for module in SHAPES:
        assert np.array_equal(plain[module].factors.B.data, np.concatenate([a[module].B.data, c[module].B.data], 1))
        assert np.array_equal(plain[module].factors.A.data, np.concatenate([a[module].A.data, c[module].A.data]))


def test_an_energy_target_picks_the_smallest_rank_per_layer_that_holds_it():
    sources = [Source(lora(x, 8, seed, decay=0.5)) for x, seed in (("a", 1), ("b", 2))]
    fused = fuse(sources, "svd", energy=0.9)
    for module in SHAPES:
        S = np.linalg.svd(weighted_sum(sources, module), compute_uv=False)
        share = np.cumsum(S**2) / (S**2).sum()
        expected = int((share < 0.9).sum()) + 1
        layer = fused.layers[module]
        assert layer.factors.rank == expected and layer.energy_kept >= 0.9
    assert fused.energy_kept >= 0.9


def test_the_default_rank_is_the_largest_input_rank():
    assert fuse(SOURCES, "svd").rank == 6


def test_the_result_has_the_inputs_dtype_or_the_one_asked_for():
    first = next(iter(SHAPES))
    x = lora("x", 4, 1)
    bf16 = Source(
        LoraFile("x", {m: factors(f.A.float32(), f.B.float32(), dtype="BF16") for m, f in x.layers.items()}, {}, "t")
    )
    assert fuse([bf16, Source(lora("y", 4, 2))], "svd").layers[first].factors.A.dtype == "F32"
    fused = fuse([bf16, Source(lora("z", 4, 3))], "svd", dtype="BF16").layers[first].factors
    assert fused.B.dtype == fused.A.dtype == "BF16"
    assert fuse([bf16], "concat", dtype="F16").layers[first].factors.B.dtype == "F16"
    # bfloat16 results are the float32 results rounded to nearest even, as torch rounds them
    exact = fuse([bf16, Source(lora("z", 4, 3))], "svd").layers[first].factors
    assert torch.equal(fused.B.to_torch(), exact.B.to_torch().bfloat16())


def test_inputs_sharing_nearly_the_same_a_still_fuse_exactly():
    """LoRAs trained from one seed share almost the same A: the float32 Gram of A is then redone in float64."""
    first = lora("a", 6, 1)
    g = np.random.default_rng(9)
    twin = LoraFile(
        "b",
        {
            m: factors(
                f.A.data + 1e-5 * g.standard_normal(f.A.shape, np.float32), g.standard_normal(f.B.shape, np.float32)
            )
            for m, f in first.layers.items()
        },
        {},
        "test",
    )
    sources = [Source(first), Source(twin, 0.5), Source(LoraFile("a-again", first.layers, {}, "t"), -1.0)]
    fused = fuse(sources, "svd", rank=12)
    for module in SHAPES:
        k = fused.layers[module].factors.rank
        assert relative(delta(fused, module), top(weighted_sum(sources, module), k)[0]) < 1e-5


def test_bad_settings_and_incompatible_inputs_are_refused():
    with pytest.raises(FusionError, match="rank or an energy"):
        fuse(SOURCES, "svd", rank=4, energy=0.9)
    with pytest.raises(FusionError, match="concat keeps every rank"):
        fuse(SOURCES, "concat", rank=4)
    with pytest.raises(FusionError, match="must not be negative"):
        fuse(SOURCES, "klora")
    with pytest.raises(FusionError, match="every weight is 0"):
        fuse([Source(s.lora, 0.0) for s in SOURCES], "svd")
    other = lora("d", 4, 4, shapes={"transformer_blocks.0.attn.to_q": (48, 41)})
    with pytest.raises(IncompatibleLoras, match=r"d: transformer\.transformer_blocks\.0\.attn\.to_q\.lora_A\.weight"):
        fuse([*SOURCES, Source(other)], "svd")


def _refactored(source: LoraFile, label: str, factor: float = 1.0) -> LoraFile:
    """The same update as `source` times `factor`, stored as different factors (2 A, factor B / 2)."""
    layers = {m: factors(2 * f.A.float32(), factor * f.B.float32() / 2, f.scale) for m, f in source.layers.items()}
    return LoraFile(label, layers, {}, "test")


@pytest.mark.parametrize(
    ("method", "weights", "selection"),
    [("concat", (1.0, -1.0, 0.0), "hard"), ("svd", (0.5, 0.5, 1.0), "hard"), ("klora", (1.0, 0.0, 1.0), "soft")],
)
def test_weights_that_cancel_are_refused_instead_of_fusing_to_zero(method: str, weights: tuple, selection: str):
    """The same content at opposite weights, or three copies summing to zero (minus-a is -a): all zeros."""
    a = lora("a", 4, 1)
    copies = [a, _refactored(a, "a-again"), _refactored(a, "minus-a", -1.0)]
    sources = [Source(x, w) for x, w in zip(copies, weights, strict=True)]
    with pytest.raises(WeightsCancel, match="the weights cancel"):
        fuse(sources, method, selection=selection)


def test_weights_that_only_nearly_cancel_still_fuse():
    a, b = lora("a", 4, 1), lora("b", 4, 2)
    sources = [Source(a), Source(_refactored(a, "a-again"), -1.0), Source(b, 0.01)]
    fused = fuse(sources, "svd", rank=4)
    for module in SHAPES:
        assert relative(delta(fused, module), weighted_sum(sources, module)) < 1e-3


def test_inputs_that_change_nothing_are_refused():
    zero = LoraFile(
        "zero", {m: factors(f.A.float32(), 0 * f.B.float32()) for m, f in lora("z", 4, 1).layers.items()}, {}, "t"
    )
    with pytest.raises(FusionError, match="every input's update is zero"):
        fuse([Source(zero), Source(LoraFile("zero-too", zero.layers, {}, "t"))], "svd")


# ---- K-LoRA -----------------------------------------------------------------------------------------------------


def test_topk_abs_sum_is_exact_in_tiles():
    layer = lora("a", 4, 7).layers["transformer_blocks.0.ff.linear_in"]
    dense = np.sort(np.abs(layer.delta()).ravel())[::-1]
    for k in (1, 16, 300, dense.size):
        assert topk_abs_sum(layer, k, tile_elements=200) == pytest.approx(float(dense[:k].sum()), rel=1e-5)
    half = factors(layer.A.float32(), layer.B.float32(), -2.0, dtype="BF16")
    rounded = (half.B.to_torch() @ half.A.to_torch()).abs().flatten().float()
    expected = 2 * float(rounded.topk(50).values.sum())
    assert topk_abs_sum(half, 50, tile_elements=100) == pytest.approx(expected, rel=1e-6)


def _styles() -> list[Source]:
    """Three LoRAs, each strongest in a different layer, with different overall scales."""
    sources = []
    for index, (label, scale) in enumerate((("ink", 1.0), ("oil", 30.0), ("pencil", 0.02))):
        base = lora(label, 4, 10 + index, scale=scale)
        module = list(SHAPES)[index]
        layers = dict(base.layers)
        layers[module] = factors(layers[module].A.float32(), layers[module].B.float32() * 8, scale)
        sources.append(Source(LoraFile(label, layers, base.keys, "test"), 1.0))
    return sources


def test_hard_klora_gives_each_layer_to_the_lora_that_stands_out_there():
    """Scales differ by 1500x, yet gamma balances them: each LoRA wins the layer where it is relatively strong."""
    styles = _styles()
    fused = fuse(styles, "klora")
    for index, module in enumerate(SHAPES):
        winner = styles[index]
        assert fused.layers[module].coefficients[winner.lora.label] == 1.0
        assert relative(delta(fused, module), winner.lora.layers[module].delta()) < 1e-5
    assert fused.energy_kept == pytest.approx(1.0)  # each selected update fits the rank: nothing truncated


def test_klora_invariants_order_zero_weight_and_rescaled_factors():
    styles = _styles()
    for selection in ("hard", "soft"):
        reference = fuse(styles, "klora", selection=selection)
        reordered = fuse(styles[::-1], "klora", selection=selection)
        without = fuse(styles[:2], "klora", selection=selection)
        with_zero = fuse([*styles[:2], Source(styles[2].lora, 0.0)], "klora", selection=selection)
        regauged = [
            Source(
                LoraFile(
                    s.lora.label,
                    {m: factors(f.A.float32() / 3, f.B.float32() * 3, f.scale) for m, f in s.lora.layers.items()},
                    {},
                    "t",
                ),
                s.weight,
            )
            for s in styles
        ]
        rescaled = fuse(regauged, "klora", selection=selection)
        for module in SHAPES:
            expected = delta(reference, module)
            assert relative(delta(reordered, module), expected) < 1e-5
            assert relative(delta(rescaled, module), expected) < 1e-5
            assert relative(delta(with_zero, module), delta(without, module)) < 1e-5
            assert "pencil" not in with_zero.layers[module].coefficients


def test_klora_selection_ignores_a_loras_overall_strength_but_follows_weights():
    styles = _styles()
    louder = [
        Source(
            LoraFile(s.lora.label, {m: f._replace(scale=f.scale * 50) for m, f in s.lora.layers.items()}, {}, "t"),
            s.weight,
        )
        if s.lora.label == "ink"
        else s
        for s in styles
    ]
    for selection in ("hard", "soft"):
        a = fuse(styles, "klora", selection=selection)
        b = fuse(louder, "klora", selection=selection)
        for module in SHAPES:
            assert a.layers[module].coefficients == pytest.approx(b.layers[module].coefficients)
    # A weight is a priority: raise one LoRA's weight enough and it wins every layer.
    favoured = [Source(s.lora, 100.0 if s.lora.label == "oil" else 1.0) for s in styles]
    fused = fuse(favoured, "klora")
    assert all(layer.coefficients["oil"] == 1.0 for layer in fused.layers.values())


def test_soft_klora_mixes_every_lora_by_its_share_of_the_scores():
    styles = _styles()
    fused = fuse(styles, "klora", selection="soft", rank=12)
    for module in SHAPES:
        shares = fused.layers[module].coefficients
        assert sum(shares.values()) == pytest.approx(1.0) and all(v > 0 for v in shares.values())
        mix = sum(shares[s.lora.label] * s.lora.layers[module].delta() for s in styles)
        assert relative(delta(fused, module), mix) < 1e-5
