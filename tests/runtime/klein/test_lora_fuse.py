"""Fusion is exact: checked against dense float64 arithmetic on small shapes, and K-LoRA's invariants hold."""

from __future__ import annotations

import pytest
import torch
from kleinstyle.runtime.klein.lora_fuse import FusionError, Source, fuse, topk_abs_sum
from kleinstyle.runtime.klein.lora_io import Factors, IncompatibleLoras, LoraFile

SHAPES = {
    "transformer_blocks.0.attn.to_q": (48, 40),
    "transformer_blocks.0.ff.linear_in": (96, 40),
    "single_transformer_blocks.0.attn.to_out": (40, 72),
}


def lora(label: str, rank: int, seed: int, *, scale: float = 1.0, shapes=SHAPES, decay: float = 0.0) -> LoraFile:
    """Random factors; `decay` > 0 gives each layer a decaying spectrum (as trained LoRAs have)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (rows, cols) in shapes.items():
        spectrum = torch.exp(-decay * torch.arange(rank, dtype=torch.float32))
        layers[module] = Factors(
            torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g) * spectrum, scale
        )
    return LoraFile(label, layers, {m: f"transformer.{m}.lora_A.weight" for m in layers}, "test")


def weighted_sum(sources: list[Source], module: str) -> torch.Tensor:
    return sum(s.weight * s.lora.layers[module].delta(torch.float64) for s in sources if module in s.lora.layers)


def delta(fused, module: str) -> torch.Tensor:
    return fused.layers[module].factors.delta(torch.float64)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


SOURCES = [Source(lora("a", 4, 1), 1.0), Source(lora("b", 6, 2, scale=0.5), -0.7), Source(lora("c", 5, 3), 1.6)]


@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_svd_equals_the_dense_svd_truncation(rank: int):
    fused = fuse(SOURCES, "svd", rank=rank)
    for module in SHAPES:
        U, S, Vh = torch.linalg.svd(weighted_sum(SOURCES, module))
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
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
        assert torch.equal(plain[module].factors.B, torch.cat([a[module].B, c[module].B], 1))
        assert torch.equal(plain[module].factors.A, torch.cat([a[module].A, c[module].A]))


def test_an_energy_target_picks_the_smallest_rank_per_layer_that_holds_it():
    sources = [Source(lora(x, 8, seed, decay=0.5)) for x, seed in (("a", 1), ("b", 2))]
    fused = fuse(sources, "svd", energy=0.9)
    for module in SHAPES:
        S = torch.linalg.svdvals(weighted_sum(sources, module))
        share = torch.cumsum(S**2, 0) / (S**2).sum()
        expected = int((share < 0.9).sum()) + 1
        layer = fused.layers[module]
        assert layer.factors.rank == expected and layer.energy_kept >= 0.9
    assert fused.energy_kept >= 0.9


def test_the_default_rank_is_the_largest_input_rank():
    assert fuse(SOURCES, "svd").rank == 6


def test_the_result_has_the_inputs_dtype_or_the_one_asked_for():
    bf16 = [
        Source(
            LoraFile(
                "x", {m: Factors(f.A.bfloat16(), f.B.bfloat16()) for m, f in lora("x", 4, 1).layers.items()}, {}, "t"
            )
        )
    ]
    assert fuse([*bf16, Source(lora("y", 4, 2))], "svd").layers[next(iter(SHAPES))].factors.A.dtype == torch.float32
    assert fuse(bf16, "svd").layers[next(iter(SHAPES))].factors.B.dtype == torch.bfloat16
    assert fuse(bf16, "concat", dtype=torch.float16).layers[next(iter(SHAPES))].factors.B.dtype == torch.float16


def test_inputs_sharing_nearly_the_same_a_still_fuse_exactly():
    """LoRAs trained from one seed share almost the same A: the float32 Gram of A is then redone in float64."""
    first = lora("a", 6, 1)
    twin = LoraFile(
        "b",
        {m: Factors(f.A + 1e-5 * torch.randn_like(f.A), torch.randn_like(f.B)) for m, f in first.layers.items()},
        {},
        "test",
    )
    sources = [Source(first), Source(twin, 0.5), Source(first.__class__("a-again", first.layers, {}, "t"), -1.0)]
    fused = fuse(sources, "svd", rank=12)
    for module in SHAPES:
        U, S, Vh = torch.linalg.svd(weighted_sum(sources, module))
        k = fused.layers[module].factors.rank
        assert relative(delta(fused, module), (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-5


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


# ---- K-LoRA -----------------------------------------------------------------------------------------------------


def test_topk_abs_sum_is_exact_in_tiles():
    factors = lora("a", 4, 7).layers["transformer_blocks.0.ff.linear_in"]
    dense = factors.delta().abs().flatten()
    for k in (1, 16, 300, dense.numel()):
        assert topk_abs_sum(factors, k, tile_elements=200) == pytest.approx(float(dense.topk(k).values.sum()), rel=1e-5)
    half = Factors(factors.A.bfloat16(), factors.B.bfloat16(), -2.0)
    rounded = (half.B @ half.A).abs().flatten().float()
    assert topk_abs_sum(half, 50, tile_elements=100) == pytest.approx(
        2 * float(rounded.topk(50).values.sum()), rel=1e-6
    )


def _styles() -> list[Source]:
    """Three LoRAs, each strongest in a different layer, with different overall scales."""
    sources = []
    for index, (label, scale) in enumerate((("ink", 1.0), ("oil", 30.0), ("pencil", 0.02))):
        base = lora(label, 4, 10 + index, scale=scale)
        module = list(SHAPES)[index]
        layers = dict(base.layers)
        layers[module] = Factors(layers[module].A, layers[module].B * 8, scale)
        sources.append(Source(LoraFile(label, layers, base.keys, "test"), 1.0))
    return sources


def test_hard_klora_gives_each_layer_to_the_lora_that_stands_out_there():
    """Scales differ by 1500x, yet gamma balances them: each LoRA wins the layer where it is relatively strong."""
    styles = _styles()
    fused = fuse(styles, "klora")
    for index, module in enumerate(SHAPES):
        winner = styles[index]
        assert fused.layers[module].coefficients[winner.lora.label] == 1.0
        assert relative(delta(fused, module), winner.lora.layers[module].delta(torch.float64)) < 1e-5
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
                    s.lora.label, {m: Factors(f.A / 3.0, f.B * 3.0, f.scale) for m, f in s.lora.layers.items()}, {}, "t"
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
        mix = sum(shares[s.lora.label] * s.lora.layers[module].delta(torch.float64) for s in styles)
        assert relative(delta(fused, module), mix) < 1e-5
