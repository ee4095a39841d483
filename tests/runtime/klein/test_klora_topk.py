"""K-LoRA's pruned top-K pass is exact: the sum of the k largest |entries| and the coefficients it leads to match
a dense reference (float64, the product rounded as the factors' dtype rounds it) and the previous algorithm (torch,
every entry computed) on random and adversarial inputs: ties, all-equal magnitudes, one dominant LoRA, k larger than
the matrix, zero factors, negative scales, tiny and huge magnitudes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kleinstyle.runtime.klein.lora_fuse import Source, TopKSum, fuse, klora_coefficients, topk_abs_sum
from kleinstyle.runtime.klein.lora_io import Factors, LoraFile
from kleinstyle.runtime.klein.tensorfile import Stored

DTYPES = ("BF16", "F16", "F32", "F64")


def factors(A: np.ndarray, B: np.ndarray, scale: float = 1.0, dtype: str = "F32") -> Factors:
    if dtype == "F64":
        return Factors(Stored(A.astype(np.float64), "F64"), Stored(B.astype(np.float64), "F64"), scale)
    return Factors(Stored.from_float32(A, dtype), Stored.from_float32(B, dtype), scale)


def random_factors(g: np.random.Generator, out: int, inn: int, rank: int, dtype: str = "F32", scale: float = 1.0):
    A = g.standard_normal((rank, inn)).astype(np.float32) / math.sqrt(inn)
    B = 0.01 * g.standard_normal((out, rank)).astype(np.float32)
    return factors(A, B, scale, dtype)


def dense_topk(f: Factors, k: int) -> float:
    """Float64 product of the factors' values, rounded to float32 and then to the dtype a product in the factors'
    dtype has (bfloat16, float16; float32 otherwise, as before), the k largest magnitudes summed."""
    values = (f.B.float32().astype(np.float64) @ f.A.float32().astype(np.float64)).astype(np.float32)
    dtype = f.A.dtype if f.A.dtype == f.B.dtype and f.A.dtype in ("BF16", "F16") else "F32"
    if dtype != "F32":
        values = Stored.from_float32(values, dtype).float32()
    ordered = np.sort(np.abs(values).ravel().astype(np.float64))[::-1]
    return abs(f.scale) * float(ordered[:k].sum())


def torch_topk(f: Factors, k: int) -> float:
    """The previous algorithm: every entry computed by torch in the factors' dtype (float32 unless both are
    bfloat16, float16 or float32), the k largest magnitudes summed."""
    A, B = f.A.to_torch(), f.B.to_torch()
    dtype = (
        A.dtype if A.dtype == B.dtype and A.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    )
    values = (B.to(dtype) @ A.to(dtype)).abs().flatten()
    return float(values.topk(min(k, values.numel())).values.to(torch.float64).sum()) * abs(f.scale)


def check(f: Factors, k: int, **kwargs) -> float:
    """topk_abs_sum against both references; returns it."""
    got = topk_abs_sum(f, k, **kwargs)
    assert got == pytest.approx(torch_topk(f, k), rel=1e-5, abs=1e-300)
    assert got == pytest.approx(dense_topk(f, k), rel=1e-5, abs=1e-300)
    return got


# ---- the top-K sum ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_factors_of_every_shape_and_tile(dtype: str):
    g = np.random.default_rng(3)
    for _ in range(12):
        out, inn, rank = (int(x) for x in (g.integers(1, 90), g.integers(1, 90), g.integers(1, 9)))
        f = random_factors(g, out, inn, rank, dtype, scale=float(g.choice([1.0, -0.5, 7.0])))
        for k in (1, 3, int(g.integers(1, out * inn + 1)), out * inn):
            check(f, k, tile_elements=int(g.integers(1, 3000)))


def test_k_larger_than_the_matrix_sums_every_entry():
    f = random_factors(np.random.default_rng(1), 7, 5, 3)
    assert check(f, 1000) == pytest.approx(float(np.abs(f.delta()).sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_and_all_equal_magnitudes(dtype: str):
    g = np.random.default_rng(5)
    ones = factors(np.ones((4, 30), np.float32), np.ones((40, 4), np.float32), 1.0, dtype)
    for k in (1, 16, 599, 1200, 5000):
        assert check(ones, k, tile_elements=64) == pytest.approx(4.0 * min(k, 1200))
    signs = factors(np.sign(g.standard_normal((6, 50))), np.sign(g.standard_normal((60, 6))), -2.0, dtype)  # integers
    for k in (1, 10, 100, 2999):
        check(signs, k, tile_elements=100)
    same_rows = factors(g.standard_normal((3, 40)).astype(np.float32), np.tile(g.standard_normal((1, 3)), (50, 1)))
    for k in (1, 50, 333):
        check(same_rows, k, tile_elements=37)


def test_entries_at_their_bound_are_all_found():
    """Rank 1: every entry is exactly its Cauchy-Schwarz bound, the norms within a fraction of a percent of each
    other and shuffled, so a bound a hair too low anywhere loses entries."""
    g = np.random.default_rng(9)
    for dtype in ("F32", "BF16"):
        rows, cols = 1 + g.permutation(300) * 1e-5, 1 + g.permutation(200) * 1e-5
        f = factors(cols[None].astype(np.float32), rows[:, None].astype(np.float32), 1.0, dtype)
        for k in (1, 100, 5000, 30000):
            check(f, k, tile_elements=int(g.integers(200, 4000)))


def test_zero_factors_rows_and_columns():
    g = np.random.default_rng(6)
    A, B = g.standard_normal((4, 30)).astype(np.float32), g.standard_normal((40, 4)).astype(np.float32)
    assert check(factors(A, 0 * B), 10) == 0.0
    assert check(factors(0 * A, B), 10) == 0.0
    B[::2] = 0  # half the rows, and a third of the columns, zero
    A[:, ::3] = 0
    for k in (1, 50, 400, 1200):
        check(factors(A, B, -1.5), k, tile_elements=50)


def test_tiny_and_huge_magnitudes_stay_exact():
    """Norms summed in float32 would underflow (1e-25 entries) or lose their bits: measured again in float64."""
    g = np.random.default_rng(7)
    A, B = g.standard_normal((5, 30)).astype(np.float32), g.standard_normal((40, 5)).astype(np.float32)
    for magnitude in (1e-25, 1e-19, 1e15):
        for dtype in ("F32", "F64"):
            check(factors(A * np.float32(magnitude), B, 1.0, dtype), 64, tile_elements=60)
    mixed = B.copy()
    mixed[:20] *= np.float32(1e-24)  # half the rows far below the others
    check(factors(A, mixed), 300, tile_elements=60)


def test_bounds_hold_and_close_at_every_refinement():
    g = np.random.default_rng(8)
    for dtype in ("BF16", "F32"):
        f = random_factors(g, 300, 200, 8, dtype, scale=-3.0)
        exact = dense_topk(f, 64)
        bounds = TopKSum(f, 64, tile_elements=2000)
        steps = 0
        while not bounds.exact:
            bounds.refine()
            steps += 1
            assert bounds.lower <= exact * (1 + 1e-6) and bounds.upper >= exact * (1 - 1e-6)
        assert bounds.lower == pytest.approx(exact, rel=1e-6) and bounds.upper == pytest.approx(exact, rel=1e-6)
        assert steps > 1 and bounds.computed < f.shape[0] * f.shape[1]  # entries that cannot count are skipped
    for level in (1e-3, 1e-4):  # refining to a level computes every entry whose bound reaches it
        bounds = TopKSum(random_factors(g, 100, 90, 4), 16, tile_elements=500)
        bounds.refine(level)
        assert bounds.frontier < level or bounds.exact


def test_bounds_refined_in_turn_stay_exact():
    """Several sums refined alternately in one thread (as hard selection does) do not disturb each other."""
    g = np.random.default_rng(10)
    layers = [random_factors(g, 200, 150, 6, "BF16") for _ in range(3)]
    bounds = [TopKSum(f, 36, tile_elements=3000) for f in layers]
    while not all(b.exact for b in bounds):
        for b in bounds:
            if not b.exact:
                b.refine()
    for b, f in zip(bounds, layers, strict=True):
        assert b.lower == pytest.approx(dense_topk(f, 36), rel=1e-6)


# ---- the coefficients -------------------------------------------------------------------------------------------


SHAPES = {"blocks.0.to_q": (64, 48), "blocks.0.ff": (96, 48), "single.0.to_out": (48, 80), "single.1.to_out": (48, 80)}


def lora(label: str, seed: int, rank: int = 4, *, scale: float = 1.0, dtype: str = "BF16", shapes=SHAPES) -> LoraFile:
    g = np.random.default_rng(seed)
    layers = {m: random_factors(g, rows, cols, rank, dtype, scale) for m, (rows, cols) in shapes.items()}
    return LoraFile(label, layers, {}, "test")


def scaled(source: LoraFile, label: str, factor: float, modules=None) -> LoraFile:
    """`source` with its update in `modules` (default: all) multiplied by `factor`."""
    layers = {
        m: f._replace(scale=f.scale * factor) if modules is None or m in modules else f
        for m, f in source.layers.items()
    }
    return LoraFile(label, layers, {}, "test")


def previous_coefficients(sources: list[Source], modules: list[str], selection: str) -> dict[str, dict[str, float]]:
    """The previous algorithm: gamma from each layer's RMS entry, scores w S / gamma with S every entry's top-K."""
    present = {m: [s for s in sources if m in s.lora.layers] for m in modules}
    logs: dict[str, list[float]] = {s.lora.label: [] for s in sources}
    for m in modules:
        rms = [math.sqrt(np.square(s.lora.layers[m].delta()).mean()) for s in present[m]]
        if all(v > 0 for v in rms):
            center = sum(math.log(v) for v in rms) / len(rms)
            for s, v in zip(present[m], rms, strict=True):
                logs[s.lora.label].append(math.log(v) - center)

    def trimmed(values: list[float]) -> float:
        ordered, cut = sorted(values), int(len(values) * 0.1)
        kept = ordered[cut : len(ordered) - cut] or ordered
        return sum(kept) / len(kept)

    gamma = {label: math.exp(trimmed(v)) if v else 1.0 for label, v in logs.items()}
    result = {}
    for m in modules:
        ranks = sorted((s.lora.layers[m].rank for s in present[m]), reverse=True)
        k = ranks[0] * (ranks[1] if len(ranks) > 1 else ranks[0])
        scores = {s.lora.label: s.weight * torch_topk(s.lora.layers[m], k) / gamma[s.lora.label] for s in present[m]}
        total, top = sum(scores.values()), max(scores.values())
        if total <= 0:
            result[m] = {label: 1 / len(scores) for label in scores}
        elif selection == "soft":
            result[m] = {label: score / total for label, score in scores.items()}
        else:
            winners = [label for label, score in scores.items() if score == top]
            result[m] = {label: (1 / len(winners) if label in winners else 0.0) for label in scores}
    return result


def assert_same_coefficients(sources: list[Source], selection: str) -> dict[str, dict[str, float]]:
    modules = sorted({m for s in sources for m in s.lora.layers})
    got = klora_coefficients(sources, modules, selection)  # type: ignore[arg-type]
    expected = previous_coefficients(sources, modules, selection)
    for m in modules:
        assert got[m] == pytest.approx(expected[m], rel=1e-5, abs=1e-9), m
    return got


@pytest.mark.parametrize("selection", ["hard", "soft"])
def test_coefficients_equal_the_previous_algorithms_on_random_loras(selection: str):
    for seed, weights in ((1, (1.0, 0.7, 0.5)), (2, (1.0, 1.0, 1.0)), (3, (0.2, 5.0, 1.0)), (4, (1.0, 0.98, 1.0))):
        sources = [Source(lora(f"s{i}", seed * 10 + i, rank=2 + i), w) for i, w in enumerate(weights)]
        assert_same_coefficients(sources, selection)


@pytest.mark.parametrize("selection", ["hard", "soft"])
def test_coefficients_equal_the_previous_algorithms_on_adversarial_loras(selection: str):
    a, b, c = lora("a", 1), lora("b", 2, dtype="F32"), lora("c", 3, rank=6, dtype="F16")
    dominant = scaled(lora("dominant", 4), "dominant", 40.0, modules={"blocks.0.ff"})
    twin = scaled(a, "twin", 1.0)  # the same update: tied scores share the layer
    negative = scaled(b, "negative", -2.0)  # a negative scale is the same magnitudes
    zero = LoraFile("zero", {m: f._replace(scale=0.0) for m, f in c.layers.items()}, {}, "test")
    partial = LoraFile("partial", {m: f for m, f in b.layers.items() if m.startswith("single")}, {}, "test")
    cases = [
        [Source(a), Source(b), Source(dominant)],
        [Source(a), Source(twin)],
        [Source(a, 0.5), Source(twin, 0.5), Source(b, 0.5)],
        [Source(b), Source(negative, 0.5)],
        [Source(a), Source(zero)],
        [Source(zero), Source(scaled(zero, "zero-too", 1.0))],
        [Source(c), Source(partial), Source(a, 0.3)],
    ]
    for sources in cases:
        got = assert_same_coefficients(sources, selection)
        if sources[1].lora.label == "twin":  # a tie, exactly: the twins share whatever they get
            assert all(layer["a"] == layer["twin"] for layer in got.values())


def test_a_dominant_lora_takes_its_layer_and_the_other_layers_follow_the_scores():
    a, b = lora("a", 1), lora("b", 2)
    dominant = scaled(lora("d", 3), "d", 50.0, modules={"single.0.to_out"})
    fused = fuse([Source(a), Source(b), Source(dominant)], "klora")
    assert fused.layers["single.0.to_out"].coefficients["d"] == 1.0
    assert all(sum(layer.coefficients.values()) == pytest.approx(1.0) for layer in fused.layers.values())
