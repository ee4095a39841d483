"""Fuse several LoRAs into one, exactly: concat, the low-rank SVD of their weighted sum, or K-LoRA's selection.

Every method builds, per layer, the update sum_i c_i * dW_i with dW_i = s_i * B_i @ A_i (s_i the file's scale)
and coefficients c_i: the user's weights for `concat` and `svd`, K-LoRA's per-layer selection for `klora`.

`concat` stacks the factors: B = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...], A = [A_1; A_2; ...]; exact, rank = sum of ranks.

`svd` is the exact truncated SVD of that sum without ever forming a dense matrix (a 9B layer's dense SVD takes
minutes). With the stacked factors B (out x R) and A (R x in) and D the diagonal of coefficients and scales:
  1. G_a = A A^T = V diag(l) V^T (R x R; float32 while l_min > 1e-6 l_max, else float64, dropping l below
     1e-13 l_max: directions of A no float32 input resolves); F = V diag(sqrt l), so A = F Q^T, Q orthonormal.
  2. X = B D F has the singular values of dW = B D A = X Q^T; X^T X = F^T (D G_b D) F with G_b = B^T B (float32:
     B's conditioning does not matter, no inverse of it is ever taken) = W diag(m) W^T, m = the squared singular
     values of dW, sorted.
  3. keep k directions (a rank, or the smallest k holding a fraction of sum m, the "energy"), then
     B_out = B (D F W_k m_k^-1/4) and A_out = (m_k^1/4 W_k^T diag(1/sqrt l) V^T) A: two thin products.
  At full rank B_out A_out = B D A exactly. The costs are the two Gram products and the two thin products, all
  matrix-matrix work on the factors; nothing is O(out x in). A QR of the stacked factors gives the same result at
  several times the cost (`bench/fuse.py` runs it as the baseline).
Layers are independent: a pool of threads takes one layer each, every thread's BLAS single-threaded (one layer per
core scales, and never pays the synchronisation a multi-threaded BLAS call pays on small matrices, which gets very
slow when another process holds a core). Arithmetic is numpy float32 (float64 for the small matrices); inputs are
converted a layer at a time straight into place (bfloat16: one shift), and torch is not imported except for
K-LoRA's dense pass (importing torch takes longer than a 9B fusion).

`klora` generalises K-LoRA (Ouyang et al., CVPR 2025) to N LoRAs with weights and bakes it into one static LoRA.
K-LoRA compares, per layer, the sum of the K largest |dW| entries of each LoRA (K = r_1 r_2), balanced by a
global factor gamma, and applies one LoRA per layer. Here, per layer l and input i:
    pi_il = w_i * S_il / gamma_i,  S_il = sum of the K_l largest |dW_il|, K_l = product of the two largest ranks,
    gamma_i = exp(trimmed mean over layers of log(rms_il / geometric mean over j of rms_jl)),
where rms_il is the root-mean-square entry of dW_il (exact from the Gram matrices; K-LoRA uses the mean absolute
entry, which needs a second pass over every dense entry; both are first-degree magnitudes, so either cancels a
LoRA's overall scale, which is gamma's only role). Selection:
- hard (default, K-LoRA's own rule): layer l takes the LoRA with the largest pi_il at full strength (ties share);
  the result keeps each selected update exactly, so at the inputs' rank no energy is lost;
- soft: layer l takes sum_i p_il dW_il with p_il = pi_il / sum_j pi_jl, truncated like `svd`.
Weights are priorities: a weight scales a LoRA's score, not its strength (each layer sums to strength 1; set the
strength when generating). Weight 0 removes a LoRA; negative weights are refused. K-LoRA also multiplies the
style LoRA's score by a time scale s(t) rising over the denoising steps, so content leads early and style late.
A static LoRA cannot follow t, and N style LoRAs have no content/style roles: the baked version uses s = 1. Its
average over the schedule would only be a constant factor on one LoRA's score, which is what a weight is.
Invariants (tested): input order does not matter, weight 0 equals leaving the LoRA out, and rescaling a LoRA's
factors (c B, A / c) changes nothing; scaling a LoRA's whole update does not change which layers it wins.
Weights that cancel (the sum holds under CANCELLED of its terms' energy, estimated per layer from a few random
probes) are refused before anything is fused: the result would be an all-zero LoRA reported as keeping everything.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from .lora_format import COMPONENT_PREFIX
from .lora_io import Factors, LoraFile, check_compatible
from .tensorfile import Stored

Method = Literal["concat", "svd", "klora"]
Selection = Literal["hard", "soft"]
METHODS: tuple[str, ...] = ("concat", "svd", "klora")
A_FLOAT32 = 1e-6  # A A^T in float32 is trusted while its eigenvalues stay above this fraction of the largest
A_DROP = 1e-13  # eigenvalues of A A^T (float64) below this fraction of the largest are beyond float32 inputs
M_DROP = 1e-12  # squared singular values below this fraction of the largest are numerically zero
TRIM = 0.1  # gamma's trimmed mean drops this fraction of layers at each end
TILE_ELEMENTS = 1 << 22  # dense entries per tile in K-LoRA's top-K pass
CANCELLED = 1e-6  # a weighted sum holding less than this fraction of its terms' energy: the weights cancel
PROBES = 8  # random vectors that estimate a layer's energy before fusing


class FusionError(ValueError):
    """Fusion settings that cannot work (no input left, a negative K-LoRA priority, a bad rank or energy)."""


class WeightsCancel(FusionError):
    """The weighted sum is (numerically) zero: same-content LoRAs at opposite weights, or sources summing to zero.
    Fusing would write an all-zero LoRA whose every layer "keeps all its energy", and it would change nothing."""


@dataclass(frozen=True)
class Source:
    lora: LoraFile
    weight: float = 1.0


@dataclass
class FusedLayer:
    factors: Factors  # the result for this layer (scale 1)
    energy: float  # squared Frobenius norm of the layer's target update (concat: 1, it keeps all of it)
    kept: float  # the part of it the result keeps
    coefficients: dict[str, float] = field(default_factory=dict)  # input label -> c_i in this layer

    @property
    def energy_kept(self) -> float:
        return 1.0 if self.energy <= 0 else self.kept / self.energy


@dataclass
class Fused:
    method: str
    layers: dict[str, FusedLayer]
    selection: str | None = None
    partial: dict[str, tuple[str, ...]] = field(default_factory=dict)  # module -> inputs that do not update it
    base: str | None = None

    @property
    def rank(self) -> int:
        return max((layer.factors.rank for layer in self.layers.values()), default=0)

    @property
    def energy_kept(self) -> float:
        total = sum(layer.energy for layer in self.layers.values())
        return 1.0 if total <= 0 else sum(layer.kept for layer in self.layers.values()) / total

    def tensors(self) -> dict[str, Stored]:
        """The fused LoRA in the artifact format (`transformer.<module>.lora_A/B.weight`, nothing to scale)."""
        out: dict[str, Stored] = {}
        for module, layer in self.layers.items():
            out[f"{COMPONENT_PREFIX}{module}.lora_A.weight"] = layer.factors.A
            out[f"{COMPONENT_PREFIX}{module}.lora_B.weight"] = layer.factors.B
        return out


LayerDone = Callable[[str, FusedLayer], None]
T = TypeVar("T")


def fuse(
    sources: Sequence[Source],
    method: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    selection: Selection = "hard",
    dtype: str | None = None,
    on_layer: LayerDone | None = None,
) -> Fused:
    """Fuse `sources` with `method`. `rank` or `energy` bound svd and klora (default: the largest input rank);
    `dtype` (BF16, F16, F32) is the result's (default: the inputs' common one). Refuses incompatible inputs
    (IncompatibleLoras). `on_layer(module, layer)` is called in this thread as each layer is done (in no
    particular order), so a writer can stream the result while the rest is computed."""
    if method not in METHODS:
        raise FusionError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if rank is not None and energy is not None:
        raise FusionError("give a rank or an energy, not both")
    if method == "concat" and (rank is not None or energy is not None):
        raise FusionError("concat keeps every rank exactly: rank and energy apply to svd and klora only")
    if rank is not None and rank < 1:
        raise FusionError(f"rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise FusionError(f"energy must be in (0, 1], not {energy}")
    if dtype is not None and dtype not in ("BF16", "F16", "F32"):
        raise FusionError(f"the result's dtype must be BF16, F16 or F32, not {dtype!r}")
    if method == "klora" and any(s.weight < 0 for s in sources):
        bad = next(s for s in sources if s.weight < 0)
        raise FusionError(f"{bad.lora.label}: klora weights are priorities and must not be negative ({bad.weight})")
    labels = [s.lora.label for s in sources]
    if len(set(labels)) != len(labels):
        raise FusionError(f"an input is given twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    compat = check_compatible([s.lora for s in sources])
    active = [s for s in sources if s.weight != 0]
    if not active:
        raise FusionError("every weight is 0: nothing to fuse")
    out_dtype = dtype or _common_dtype(active)
    target = rank if rank is not None else (None if energy is not None else max(s.lora.max_rank for s in active))
    modules = [m for m in compat.layers if any(m in s.lora.layers for s in active)]
    names = {s.lora.label for s in active}
    gaps = {m: tuple(x for x in missing if x in names) for m, missing in compat.partial.items() if m in modules}
    partial = {m: missing for m, missing in gaps.items() if missing}

    if method == "klora":
        coefficients = klora_coefficients(active, modules, selection)
    else:
        coefficients = {m: {s.lora.label: s.weight for s in active if m in s.lora.layers} for m in modules}

    def parts_of(module: str) -> list[tuple[Factors, float]]:
        parts = [(s.lora.layers[module], coefficients[module][s.lora.label]) for s in active if module in s.lora.layers]
        return [(f, c) for f, c in parts if c != 0]

    _refuse_cancelling(active, parallel_map(lambda module: weighted_energy(parts_of(module)), modules))

    def one(module: str) -> FusedLayer:
        parts = parts_of(module)
        layer = (
            concat_layer(parts, out_dtype) if method == "concat" else lowrank_layer(parts, target, energy, out_dtype)
        )
        layer.coefficients = coefficients[module]
        return layer

    layers = dict(zip(modules, parallel_map(one, modules, on_done=on_layer), strict=True))
    return Fused(method, layers, selection if method == "klora" else None, partial, compat.base)


def weighted_energy(parts: Sequence[tuple[Factors, float]], probes: int = PROBES) -> tuple[float, float]:
    """Estimates of ||sum_i c_i dW_i||^2 and sum_i ||c_i dW_i||^2 for one layer, from random Gaussian vectors x
    (E ||M x||^2 = ||M||_F^2): thin products only, so every layer is checked before any is fused. Exactly
    cancelling terms give exactly cancelling probes, up to float32 rounding (about 1e-14 of the terms' energy)."""
    if not parts:
        return 0.0, 0.0
    x = np.random.default_rng(0).standard_normal((parts[0][0].shape[1], probes)).astype(np.float32)
    total = np.zeros((parts[0][0].shape[0], probes))
    separate = 0.0
    for f, c in parts:
        y = (f.B.float32() @ (f.A.float32() @ x)).astype(np.float64) * (c * f.scale)
        separate += float(np.square(y).sum())
        total += y
    return float(np.square(total).sum()) / probes, separate / probes


def _refuse_cancelling(active: Sequence[Source], energies: Sequence[tuple[float, float]]) -> None:
    """WeightsCancel (FusionError) when the fused update would be all zeros: nothing to write, nothing it does."""
    total, separate = sum(e[0] for e in energies), sum(e[1] for e in energies)
    if separate == 0:
        raise FusionError("every input's update is zero (untrained LoRAs?): the fusion would change nothing")
    if total <= CANCELLED * separate:
        weights = ", ".join(f"{s.lora.label} {s.weight:g}" for s in active)
        raise WeightsCancel(
            f"the weights cancel: the weighted sum of the inputs keeps {total / separate:.1e} of their energy, "
            f"an all-zero LoRA that would change nothing (weights: {weights})"
        )


def _common_dtype(sources: Sequence[Source]) -> str:
    """The inputs' dtype when they share one; float64 if any is; float32 for any other mix."""
    dtypes = {t.dtype for s in sources for f in s.lora.layers.values() for t in (f.A, f.B)}
    if len(dtypes) == 1:
        return dtypes.pop()
    return "F64" if "F64" in dtypes else "F32"


# ---- threads ----------------------------------------------------------------------------------------------------


def workers() -> int:
    """How many layers to work on at once: the CPUs this process may use (OMP_NUM_THREADS when set, its cpuset
    and, in a container, its cgroup CPU limit), not the machine's."""
    count = os.cpu_count() or 1
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        count = min(count, max(1, int(os.environ["OMP_NUM_THREADS"])))
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, count)


@contextmanager
def _single_threaded_math() -> Iterator[None]:
    """BLAS (and torch, where it is loaded) on one thread each: the parallelism is ours, a layer per thread."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch else None
    with threadpool_limits(limits=1, user_api="blas"):
        if torch:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch and previous:
                torch.set_num_threads(previous)


def parallel_map(
    function: Callable[[str], T],
    items: Sequence[str],
    *,
    on_done: Callable[[str, T], None] | None = None,
    threads: int | None = None,
) -> list[T]:
    """`function` over `items` on a pool of threads (module docstring); `on_done` runs in the calling thread."""
    results: dict[int, T] = {}
    with _single_threaded_math(), ThreadPoolExecutor(max_workers=threads or workers()) as pool:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_done:
                on_done(items[index], results[index])
    return [results[index] for index in range(len(items))]


# ---- one layer --------------------------------------------------------------------------------------------------


def _store(values: np.ndarray, dtype: str) -> Stored:
    return Stored.from_float32(values, dtype) if dtype != "F64" else Stored(values.astype(np.float64), "F64")


def concat_layer(parts: Sequence[tuple[Factors, float]], dtype: str) -> FusedLayer:
    """The weighted sum as one LoRA of rank sum(r_i): exact (a factor keeps its bits when its coefficient is 1 and
    its dtype the result's; otherwise its coefficient is applied in float32 and rounded once)."""
    if not parts:
        raise FusionError("no input updates this layer")

    def as_dtype(stored: Stored, factor: float) -> np.ndarray:
        if factor == 1.0 and stored.dtype == dtype:
            return stored.data
        return _store(stored.float32() * np.float32(factor), dtype).data

    B = np.concatenate([as_dtype(f.B, c * f.scale) for f, c in parts], axis=1)
    A = np.concatenate([as_dtype(f.A, 1.0) for f, _ in parts], axis=0)
    return FusedLayer(Factors(Stored(A, dtype), Stored(B, dtype)), 1.0, 1.0)  # all of it, whatever it is


def _prepare(parts: Sequence[tuple[Factors, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the B's side by side, out x R, and the A's stacked, R x in, both float32; coefficient x scale per rank
    column, float64). Each input is converted straight into its place: one pass over it, no concatenation."""
    (out, inn), total = parts[0][0].shape, sum(f.rank for f, _ in parts)
    B, A = np.empty((out, total), np.float32), np.empty((total, inn), np.float32)
    d, at = np.empty(total), 0
    for f, c in parts:
        f.B.float32(out=B[:, at : at + f.rank])
        f.A.float32(out=A[at : at + f.rank])
        d[at : at + f.rank] = c * f.scale
        at += f.rank
    return B, A, d


def _gram_eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending, all resolvable ones) and eigenvectors of A A^T for float32 A.

    A float32 Gram matrix resolves eigenvalues down to about 1e-6 of the largest; below that (two inputs sharing
    nearly the same A, as LoRAs trained from one seed do) it is formed again in float64, where directions under
    1e-13 of the largest are dropped as beyond any float32 input's precision.
    """
    la, Va = np.linalg.eigh((A @ A.T).astype(np.float64))
    if la[0] < la[-1] * A_FLOAT32:
        A64 = A.astype(np.float64)
        la, Va = np.linalg.eigh(A64 @ A64.T)
    keep = la > la[-1] * A_DROP
    return la[keep], Va[:, keep]


def lowrank_layer(
    parts: Sequence[tuple[Factors, float]], rank: int | None, energy: float | None, dtype: str
) -> FusedLayer:
    """The exact truncated SVD of sum_i c_i s_i B_i A_i, to `rank` or to the smallest rank keeping `energy`."""
    if not parts:
        raise FusionError("no input updates this layer")
    B, A, d = _prepare(parts)
    out = B.shape[0]
    la, Va = _gram_eigh(A)
    F = Va * np.sqrt(la)  # A = F Q^T, Q orthonormal
    Gb = (B.T @ B).astype(np.float64) * np.outer(d, d)  # numpy computes X^T X as a symmetric rank-k update
    m, W = np.linalg.eigh(F.T @ Gb @ F)
    m, W = m[::-1], W[:, ::-1]  # largest first
    total = float(np.clip(m, 0, None).sum())
    nonzero = int((m > m[0] * M_DROP).sum()) if total > 0 else 0
    if energy is not None:
        cumulative = np.cumsum(np.clip(m[:nonzero], 0, None))
        k = int((cumulative < energy * total * (1 - 1e-12)).sum()) + 1
    else:
        k = rank if rank is not None else nonzero
    k = max(1, min(k, nonzero)) if nonzero else 0
    if k == 0:  # the weighted sum is zero here: a rank-1 zero update
        zeros = Factors(
            _store(np.zeros((1, A.shape[1]), np.float32), dtype), _store(np.zeros((out, 1), np.float32), dtype)
        )
        return FusedLayer(zeros, 0.0, 0.0)
    mk, Wk = m[:k], W[:, :k]
    left = ((d[:, None] * F) @ (Wk * mk**-0.25)).astype(np.float32)  # R x k
    right = ((mk**0.25)[:, None] * Wk.T @ (Va / np.sqrt(la)).T).astype(np.float32)  # k x R
    return FusedLayer(Factors(_store(right @ A, dtype), _store(B @ left, dtype)), total, float(mk.sum()))


# ---- K-LoRA -----------------------------------------------------------------------------------------------------


def topk_abs_sum(factors: Factors, k: int, tile_elements: int = TILE_ELEMENTS) -> float:
    """Sum of the k largest |entries| of scale * B @ A, exactly, without holding the dense matrix.

    The one place fusion uses torch: the product is formed a tile of rows at a time into one reused buffer, in the
    factors' own dtype, and torch runs bfloat16 products on the CPU's matrix units (twice numpy's float32 here).
    |x| is taken on the bit pattern (sign bit cleared: for floats of one sign the integer order is the numeric
    order). Maxima over groups of 64 entries bound everything: a group whose maximum is below the running k-th
    largest value holds nothing that counts, and the k-th largest group maximum of a tile is itself a lower bound
    (k distinct entries reach it), so only a few groups are ever looked into.
    """
    import torch

    sign_cleared = {
        torch.bfloat16: (torch.int16, 0x7FFF),
        torch.float16: (torch.int16, 0x7FFF),
        torch.float32: (torch.int32, 0x7FFFFFFF),
    }
    A, B = factors.A.to_torch(), factors.B.to_torch()
    dtype = A.dtype if A.dtype == B.dtype and A.dtype in sign_cleared else torch.float32
    A, B = A.to(dtype), B.to(dtype)
    bits, mask = sign_cleared[dtype]
    out, inn = factors.shape
    k = min(k, out * inn)
    group = math.gcd(inn, 64)
    rows = max(1, min(out, tile_elements // inn))
    buffer = torch.empty(rows, inn, dtype=dtype)
    best = torch.empty(0, dtype=bits)
    for start in range(0, out, rows):
        tile = buffer[: min(rows, out - start)]
        torch.matmul(B[start : start + rows], A, out=tile)
        groups = tile.view(bits).bitwise_and_(mask).view(-1, group)
        maxima = groups.amax(dim=1)
        threshold = best[-1] if best.numel() == k else None
        if maxima.numel() >= k:
            floor = torch.topk(maxima, k).values[-1]
            threshold = floor if threshold is None else torch.maximum(threshold, floor)
        if threshold is None:
            candidates = groups.reshape(-1)
        else:
            hit = (maxima >= threshold).nonzero().squeeze(1)
            candidates = groups[hit].reshape(-1)
            candidates = candidates[candidates >= threshold]
        pool = torch.cat([best, candidates])
        best = torch.topk(pool, min(k, pool.numel())).values
    return float(best.view(dtype).to(torch.float64).sum()) * abs(factors.scale)


def _rms(factors: Factors) -> float:
    """Root-mean-square entry of scale * B @ A, from the Gram matrices."""
    B, A = factors.B.float32(), factors.A.float32()
    square = float(((B.T @ B).astype(np.float64) * (A @ A.T).astype(np.float64)).sum())
    out, inn = factors.shape
    return abs(factors.scale) * math.sqrt(max(square, 0.0) / (out * inn))


def _trimmed_mean(values: Sequence[float]) -> float:
    ordered = sorted(values)
    cut = int(len(ordered) * TRIM)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


def klora_coefficients(
    sources: Sequence[Source], modules: Sequence[str], selection: Selection
) -> dict[str, dict[str, float]]:
    """Per layer, each input's coefficient under K-LoRA's selection (module docstring); inputs with weight > 0."""
    if selection not in ("hard", "soft"):
        raise FusionError(f"selection must be hard or soft, not {selection!r}")
    import torch  # noqa: F401  (the dense pass uses it: loaded before the pool, so its threads are limited too)

    present = {m: [s for s in sources if m in s.lora.layers] for m in modules}
    layer_rms = parallel_map(lambda m: [_rms(s.lora.layers[m]) for s in present[m]], modules)
    rms = {
        (m, s.lora.label): v
        for m, vs in zip(modules, layer_rms, strict=True)
        for s, v in zip(present[m], vs, strict=True)
    }
    logs: dict[str, list[float]] = {s.lora.label: [] for s in sources}
    for m in modules:
        values = [rms[m, s.lora.label] for s in present[m]]
        if any(v <= 0 for v in values):
            continue  # a zero update says nothing about a LoRA's scale
        center = sum(math.log(v) for v in values) / len(values)
        for s, v in zip(present[m], values, strict=True):
            logs[s.lora.label].append(math.log(v) - center)
    gamma = {label: math.exp(_trimmed_mean(v)) if v else 1.0 for label, v in logs.items()}

    def scores(m: str) -> dict[str, float]:
        ranks = sorted((s.lora.layers[m].rank for s in present[m]), reverse=True)
        k = ranks[0] * (ranks[1] if len(ranks) > 1 else ranks[0])
        return {s.lora.label: s.weight * topk_abs_sum(s.lora.layers[m], k) / gamma[s.lora.label] for s in present[m]}

    return {m: _select(score, selection) for m, score in zip(modules, parallel_map(scores, modules), strict=True)}


def _select(scores: dict[str, float], selection: Selection) -> dict[str, float]:
    total = sum(scores.values())
    if total <= 0:  # every candidate's update is zero here
        return {label: 1.0 / len(scores) for label in scores}
    if selection == "soft":
        return {label: score / total for label, score in scores.items()}
    top = max(scores.values())
    winners = [label for label, score in scores.items() if score == top]
    return {label: (1.0 / len(winners) if label in winners else 0.0) for label in scores}
