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
converted a layer at a time straight into place (bfloat16: one shift), and torch is never imported (importing it
takes longer than a 9B fusion). A layer that is one input's update kept whole (K-LoRA's pick, or a layer only one
input has) is that input's factors as they are, its energy from the Gram matrices.

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

S_il without the dense matrix (a 9B layer has up to 151 M entries, 26 G for three LoRAs), exactly: Cauchy-Schwarz
bounds every entry, |(B A)_jk| <= ||B_j|| ||A_k||. With B's rows and A's columns ordered by norm (a radix sort of
the norms' top bits), the entries whose bound reaches a level form a staircase: per block of rows (norms within
BLOCK_SPREAD) a prefix of the columns. `TopKSum` computes the staircase band by band (float32 tiles that stay in
cache) and keeps the entries at or above the running K-th largest; then
  lower = the sum of the K largest entries computed (K entries of the matrix),
  upper = the sum of the K largest of those and of the entries left, each taken at the largest bound left,
and the sum is exact once the largest bound left is at most the K-th largest computed. Bounds carry a margin for
the float32 sums, and the K values are rounded to the factors' dtype (rounding is monotone: the K largest stay the
K largest), as the product in that dtype (torch's bfloat16, before) rounds them. On random factors the bound only
prunes about a tenth of a layer (a row's norm says little about its largest entry), so an exact S costs nearly a
dense pass. Hard selection rarely needs one: it needs the winner. Each score is an interval [w lower / gamma,
w upper / gamma]; the leader (largest lower end) is refined while that spares its rivals more work than it costs,
and each rival goes straight to the level at which its upper end falls under the leader's lower end; a rival
that cannot (a near tie) is computed exactly, and exact scores are compared as before (ties share). The result
is the same selection, having computed only the entries that could change it (on three random rank-32 9B LoRAs
at weights 1, 0.7 and 0.5, about 3% of them). Soft selection needs every S exactly.
Weights that cancel (the sum holds under CANCELLED of its terms' energy, estimated per layer from a few random
probes of the float32 factors it is fused from) are refused once every layer is done, before `fuse` returns (the
streamed result is not kept): the result would be an all-zero LoRA reported as keeping everything.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
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
TILE_ELEMENTS = 1 << 19  # dense entries per tile in K-LoRA's top-K pass (2 MiB of float32: a core's L2)
FIRST_BAND = 32  # K-LoRA's first band computes this many times k entries, each next one as many as so far
BOUND_SLACK = 2.0**-22  # times the rank: a Cauchy-Schwarz bound's margin for float32 sums (entries and norms)
BLOCK_SPREAD = 0.01  # K-LoRA's blocks of rows span this much of a norm: a block's bound is its first row's
BLOCK_ROWS = 32  # and at least this many rows (the few largest norms are far apart)
BISECTIONS = 10  # steps of the searches for a level (to 1/1000 of the range)
MERGE_AT = 4  # K-LoRA merges the entries it keeps once this many times k are pending (the threshold rises)
MEASURE_CHUNK = 1 << 18  # factor entries converted at a time to measure norms (1 MiB of float32)
RIVAL_AIM = 0.995  # and aims the others' upper bounds this far under it (newly computed entries may raise them)
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
    particular order), so a writer can stream the result while the rest is computed; when `fuse` then raises
    (WeightsCancel: every layer is needed to tell), what was streamed is to be dropped."""
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
        coefficients, known = _klora(active, modules, selection)
    else:
        coefficients = {m: {s.lora.label: s.weight for s in active if m in s.lora.layers} for m in modules}
        known = {}

    def parts_of(module: str) -> list[tuple[Factors, float]]:
        parts = [(s.lora.layers[module], coefficients[module][s.lora.label]) for s in active if module in s.lora.layers]
        return [(f, c) for f, c in parts if c != 0]

    def one(module: str) -> tuple[FusedLayer, tuple[float, float]]:
        parts = parts_of(module)
        if method == "concat":
            layer, energies = concat_layer(parts, out_dtype), weighted_energy(parts)
        elif len(parts) == 1 and energy is None and target is not None and target >= parts[0][0].rank:
            label = next(s.lora.label for s in active if s.lora.layers.get(module) is parts[0][0])
            layer = single_layer(parts[0], out_dtype, known.get((module, label)))
            energies = (layer.energy, layer.energy)
        else:
            layer, energies = lowrank_layer(parts, target, energy, out_dtype)
        layer.coefficients = coefficients[module]
        return layer, energies

    def done(module: str, result: tuple[FusedLayer, tuple[float, float]]) -> None:
        if on_layer:
            on_layer(module, result[0])

    size = {m: math.prod(next(s.lora.layers[m].shape for s in active if m in s.lora.layers)) for m in modules}
    largest_first = sorted(modules, key=lambda m: -size[m])  # no large layer left for one thread at the end
    results = dict(zip(largest_first, parallel_map(one, largest_first, on_done=done), strict=True))
    _refuse_cancelling(active, [energies for _, energies in results.values()])
    layers = {module: results[module][0] for module in modules}
    return Fused(method, layers, selection if method == "klora" else None, partial, compat.base)


@lru_cache(maxsize=8)
def _probe_vectors(size: int, probes: int = PROBES) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((size, probes)).astype(np.float32)
    x.flags.writeable = False
    return x


def _probe(pieces: Iterable[tuple[np.ndarray, np.ndarray, float]]) -> tuple[float, float]:
    """Estimates of ||sum_i c_i B_i A_i||^2 and sum_i ||c_i B_i A_i||^2 (float32 B_i and A_i) from random
    Gaussian vectors x (E ||M x||^2 = ||M||_F^2): thin products only. Exactly cancelling terms give exactly
    cancelling probes, up to float32 rounding (about 1e-14 of the terms' energy)."""
    total: np.ndarray | None = None
    separate = 0.0
    for B, A, c in pieces:
        y = (B @ (A @ _probe_vectors(A.shape[1]))).astype(np.float64) * c
        separate += float(np.square(y).sum())
        total = y if total is None else total + y
    if total is None:
        return 0.0, 0.0
    return float(np.square(total).sum()) / PROBES, separate / PROBES


def weighted_energy(parts: Sequence[tuple[Factors, float]]) -> tuple[float, float]:
    """Estimates of ||sum_i c_i dW_i||^2 and sum_i ||c_i dW_i||^2 for one layer (`_probe`)."""
    return _probe((f.B.float32(), f.A.float32(), c * f.scale) for f, c in parts)


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


_buffers = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """This thread's scratch array `name`, grown as needed and otherwise reused (a fresh one per tile would fault
    its pages in every time)."""
    size = math.prod(shape)
    buffer: np.ndarray | None = getattr(_buffers, name, None)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = np.empty(size, dtype)
        setattr(_buffers, name, buffer)
    return buffer[:size].reshape(shape)


def _store(values: np.ndarray, dtype: str) -> Stored:
    """float32 `values` (a scratch array, perhaps) as a new tensor of `dtype`."""
    if dtype in ("F32", "F64"):
        return Stored(values.astype(np.float64 if dtype == "F64" else np.float32), dtype)  # a copy
    return Stored.from_float32(values, dtype)


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
    """(the B's side by side, out x R, and the A's stacked, R x in, both float32 in this thread's scratch;
    coefficient x scale per rank column, float64). Each input is converted straight into its place: one pass over
    it, no concatenation."""
    (out, inn), total = parts[0][0].shape, sum(f.rank for f, _ in parts)
    B, A = _scratch("stacked B", (out, total), np.float32), _scratch("stacked A", (total, inn), np.float32)
    d, at = np.empty(total), 0
    for f, c in parts:
        f.B.float32(out=B[:, at : at + f.rank])
        f.A.float32(out=A[at : at + f.rank])
        d[at : at + f.rank] = c * f.scale
        at += f.rank
    return B, A, d


def _gram_root(A: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, F^+) with F F^T = A A^T for float32 A (`gram`: float32 products in float64), F^+ F = I, so that
    A = F Q^T with Q orthonormal.

    While A A^T is well conditioned (its smallest eigenvalue provably above A_FLOAT32 of the largest: 1 / ||L^-1||_F^2
    against the trace) F is its Cholesky factor, a tenth of an eigendecomposition's cost. Otherwise F = V diag(sqrt l)
    from the eigenvalues: a float32 Gram matrix resolves them down to about 1e-6 of the largest; below that (two
    inputs sharing nearly the same A, as LoRAs trained from one seed do) it is formed again in float64, where
    directions under 1e-13 of the largest are dropped as beyond any float32 input's precision.
    """
    try:
        root = np.linalg.cholesky(gram)
        inverse = np.linalg.inv(root)
        if 1 / np.square(inverse).sum() >= A_FLOAT32 * np.trace(gram):
            return root, inverse
    except np.linalg.LinAlgError:
        pass
    la, Va = np.linalg.eigh(gram)
    if la[0] < la[-1] * A_FLOAT32:
        A64 = A.astype(np.float64)
        la, Va = np.linalg.eigh(A64 @ A64.T)
    keep = la > la[-1] * A_DROP
    la, Va = la[keep], Va[:, keep]
    return Va * np.sqrt(la), (Va / np.sqrt(la)).T


def single_layer(part: tuple[Factors, float], dtype: str, known: float | None = None) -> FusedLayer:
    """One input's update kept whole: its factors as they are (`concat_layer`), its energy c^2 ||dW||^2 from Gram
    matrices (`known`: ||dW||^2 when measured already)."""
    f, c = part
    if known is None:
        gram_b, gram_a = _measure(f.B, 0)[1], _measure(f.A, 1)[1]
        known = f.scale**2 * max(float((gram_b * gram_a).sum()), 0.0)
    energy = c**2 * known
    layer = concat_layer([part], dtype)
    layer.energy = layer.kept = energy
    return layer


def lowrank_layer(
    parts: Sequence[tuple[Factors, float]], rank: int | None, energy: float | None, dtype: str
) -> tuple[FusedLayer, tuple[float, float]]:
    """The exact truncated SVD of sum_i c_i s_i B_i A_i, to `rank` or to the smallest rank keeping `energy`, and
    the layer's energies: the sum's probed (the weights must not cancel), its terms' from the Gram matrices."""
    if not parts:
        raise FusionError("no input updates this layer")
    B, A, d = _prepare(parts)
    out = B.shape[0]
    Ga = (A @ A.T).astype(np.float64)
    Gb = (B.T @ B).astype(np.float64) * np.outer(d, d)  # numpy computes X^T X as a symmetric rank-k update
    edges = list(itertools.accumulate((f.rank for f, _ in parts), initial=0))
    separate = sum(float((Gb[a:b, a:b] * Ga[a:b, a:b]).sum()) for a, b in itertools.pairwise(edges))
    probes = ((A @ _probe_vectors(A.shape[1])) * d[:, None]).astype(np.float32)  # the sum probed in one product
    F, F_plus = _gram_root(A, Ga)  # A = F Q^T, Q orthonormal
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
        energies = (_probed(B @ probes), max(separate, 0.0))
        zeros = Factors(
            _store(np.zeros((1, A.shape[1]), np.float32), dtype), _store(np.zeros((out, 1), np.float32), dtype)
        )
        return FusedLayer(zeros, 0.0, 0.0), energies
    mk, Wk = m[:k], W[:, :k]
    left = ((d[:, None] * F) @ (Wk * mk**-0.25)).astype(np.float32)  # R x k
    right = ((mk**0.25)[:, None] * Wk.T @ F_plus).astype(np.float32)  # k x R
    A_out = np.matmul(right, A, out=_scratch("A out", (k, A.shape[1]), np.float32))
    B_out = np.matmul(B, np.hstack([left, probes]), out=_scratch("B out", (out, k + PROBES), np.float32))
    energies = (_probed(B_out[:, k:]), max(separate, 0.0))
    return FusedLayer(Factors(_store(A_out, dtype), _store(B_out[:, :k], dtype)), total, float(mk.sum())), energies


def _probed(values: np.ndarray) -> float:
    """||M||_F^2 estimated from M x for PROBES Gaussian vectors x."""
    return float(np.square(values.astype(np.float64)).sum()) / PROBES


# ---- K-LoRA -----------------------------------------------------------------------------------------------------


def _rounded_scalar(value: float, dtype: str) -> float:
    """`_rounded` for one value, in plain integer arithmetic (a numpy call per value would cost more)."""
    single = np.float32(value)
    if dtype == "BF16":
        bits = int(single.view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.uint32(bits).view(np.float32))
    return float(np.float16(single)) if dtype == "F16" else float(single)


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a product in `dtype` rounds them (to nearest even, like torch)."""
    if dtype == "BF16":
        return Stored.from_float32(values, dtype).float32()
    return values.astype(np.float16).astype(np.float32) if dtype == "F16" else values


class TopKSum:
    """Bounds on the sum of the k largest |entries| of scale * B @ A that close as entries are computed (module
    docstring, K-LoRA): `lower` <= the sum <= `upper`, equal once `exact`. `refine` computes every entry whose
    Cauchy-Schwarz bound reaches a level: rows and columns ordered by norm, a staircase of tiles."""

    def __init__(self, factors: Factors, k: int, tile_elements: int = TILE_ELEMENTS, slot: int = 0) -> None:
        (row_squares, gram_b), (col_squares, gram_a) = _measure(factors.B, 0), _measure(factors.A, 1)
        out, inn = factors.shape
        self.rms = abs(factors.scale) * math.sqrt(max(float((gram_b * gram_a).sum()), 0.0) / (out * inn))
        self.factors = factors
        self.rows, row_bounds = _by_norm(row_squares)
        self.cols, col_bounds = _by_norm(col_squares)
        self.falling = -col_bounds  # rising, for searchsorted
        self.starts = _blocks(row_bounds, max(1, tile_elements // 32))
        self.heights = np.diff(np.append(self.starts, out))
        self.block_bounds = row_bounds[self.starts] * (1 + BOUND_SLACK * factors.rank)
        self.done = np.zeros(len(self.starts), np.int64)  # per block of rows: how many ordered columns are computed
        self.group_first = _groups(self.starts)  # per block, the first block of its group
        self.tile_elements = tile_elements
        self.size, self.k = out * inn, min(k, out * inn)
        self.scale = abs(factors.scale)
        self.dtype = factors.A.dtype if factors.A.dtype == factors.B.dtype in ("BF16", "F16") else "F32"
        self.ordered_B = _Ordered(factors.B, self.rows, f"B {slot}")  # B's rows in order, float32, as needed
        self.ordered_A = _Ordered(Stored(factors.A.data.T, factors.A.dtype), self.cols, f"A {slot}")  # A's columns
        self.computed = 0
        self.frontier = float(self.block_bounds[0] * col_bounds[0]) if self.size else 0.0  # largest bound left
        self.kept = np.empty(0, np.float32)  # the largest computed |entries|: all of them until k are merged
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.threshold = 0.0  # the k-th largest computed |entry| once k are computed: nothing below it counts
        self.top = np.empty(0)  # the kept values as the product's dtype rounds them, float64, largest first
        self.sums = np.zeros(1)  # and their running sums
        self.falling_top = np.empty(0)

    @property
    def floor(self) -> float:
        """No entry below this can count: the k-th largest computed, else the least positive float."""
        return self.threshold if self.kept.size >= self.k else float(np.finfo(np.float64).tiny)

    @property
    def exact(self) -> bool:
        return self.frontier <= (self.threshold if self.kept.size >= self.k else 0.0)

    @property
    def lower(self) -> float:
        """The sum of the k largest entries computed: k entries of the matrix (or all there are)."""
        return self.scale * float(self.sums[-1])

    @property
    def upper(self) -> float:
        return self.upper_at(self.frontier)

    def upper_at(self, frontier: float) -> float:
        """The sum of the k largest of the kept values and of the entries not computed, each of these taken at
        `frontier` (the bound once everything above `frontier` is computed, if none of it beats the kept)."""
        frontier = _rounded_scalar(frontier, self.dtype)  # no entry below it rounds past it
        above = min(int(np.searchsorted(self.falling_top, -frontier)), self.k)  # kept values over `frontier`
        at = min(self.k - above, self.size - self.computed)
        below = min(self.k - above - at, len(self.top) - above)
        return self.scale * (float(self.sums[above + below]) + frontier * at)

    def level_for(self, upper: float) -> float:
        """About the highest level to refine to for `upper` to fall under the value given (a bisection: the
        bound grows with the frontier); `floor` when no level would do."""
        low, high = self.floor, self.frontier
        if self.upper_at(low) >= upper:
            return low
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            low, high = (middle, high) if self.upper_at(middle) < upper else (low, middle)
        return low

    def work_at(self, level: float) -> int:
        """How many entries are computed once `refine(level)` is done."""
        return int((self.heights * self._columns(max(level, self.floor))).sum())

    def refine(self, level: float | None = None) -> None:
        """Compute every entry whose bound reaches `level`; by default (or when that computes nothing) those that
        make about as many entries again as so far (at least FIRST_BAND k), each group of blocks as far as its first
        (bands of a coarser staircase: fewer, fuller tiles). Never below `floor`."""
        columns = self._columns(max(level or 0.0, self.floor))
        if level is None or not (columns > self.done).any():
            level = self._level(max(2 * self.computed, FIRST_BAND * self.k))
            columns = self._columns(level)
            if level > self.floor:  # a band on the way (the last one, to the floor, computes only what counts)
                columns = np.maximum(columns[self.group_first], self.done)
        touched = np.flatnonzero(columns > self.done)
        if touched.size:
            B = self.ordered_B.upto(int(self.starts[touched[-1]] + self.heights[touched[-1]]))
            A = self.ordered_A.upto(int(columns[touched[0]]))
        for top, bottom, left, right in self._tiles(touched, columns):
            tile = _scratch("tile", (bottom - top, right - left), np.float32)
            np.matmul(B[top:bottom], A[left:right].T, out=tile)
            if max(tile.max(), -tile.min()) >= self.threshold:  # most tiles hold nothing that counts
                self._take(np.abs(tile, out=tile).reshape(-1))
        self.done = columns
        self.computed = int((self.heights * columns).sum())
        open_ = columns < len(self.falling)
        self.frontier = float((self.block_bounds[open_] * -self.falling[columns[open_]]).max(initial=0.0))
        self._merge()

    def _tiles(self, touched: np.ndarray, columns: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """Rows top:bottom by ordered columns left:right of each tile computing the new entries: consecutive blocks
        with the same new columns share tiles, of at most tile_elements entries (BLOCK_ROWS rows at least)."""
        done = self.done[touched]
        breaks = np.flatnonzero((np.diff(touched) != 1) | (np.diff(done) != 0) | (np.diff(columns[touched]) != 0))
        for first, last in zip(np.append(0, breaks + 1), np.append(breaks, len(touched) - 1), strict=True):
            top, bottom = (
                int(self.starts[touched[first]]),
                int(self.starts[touched[last]] + self.heights[touched[last]]),
            )
            left, right = int(done[first]), int(columns[touched[first]])
            height = max(BLOCK_ROWS, self.tile_elements // (right - left))
            width = max(1, self.tile_elements // min(height, bottom - top))
            for row in range(top, bottom, height):
                for column in range(left, right, width):
                    yield row, min(row + height, bottom), column, min(column + width, right)

    def _columns(self, level: float) -> np.ndarray:
        """Per block of rows, how many ordered columns have a bound of at least `level` (at least those done)."""
        with np.errstate(divide="ignore"):
            reach = np.searchsorted(self.falling, -level / self.block_bounds, side="right")
        columns: np.ndarray = np.maximum(reach, self.done)
        return columns

    def _level(self, target: int) -> float:
        """The highest level (at least `floor`) whose staircase holds `target` entries: a bisection on its log."""
        low, high = max(self.floor, self.frontier * 1e-3), max(self.frontier, self.floor)
        if self.work_at(low) <= target:
            return self.floor
        for _ in range(BISECTIONS):
            middle = math.sqrt(low * high)
            low, high = (middle, high) if self.work_at(middle) >= target else (low, middle)
        return low

    def _take(self, values: np.ndarray) -> None:
        mask = np.greater_equal(values, np.float32(self.threshold), out=_scratch("mask", values.shape, np.bool_))
        self.pending.append(values[mask])
        self.pending_size += self.pending[-1].size
        if self.pending_size > MERGE_AT * self.k:
            self._merge()

    def _merge(self) -> None:
        values = np.concatenate([self.kept, *self.pending])
        self.pending, self.pending_size = [], 0
        if values.size > self.k:
            values = np.partition(values, values.size - self.k)[values.size - self.k :]
        if values.size >= self.k:
            self.threshold = float(values.min(initial=np.inf))
        self.kept = values
        self.top = np.sort(_rounded(values, self.dtype).astype(np.float64))[::-1]
        self.sums = np.concatenate([[0.0], np.cumsum(self.top)])
        self.falling_top = -self.top


class _Ordered:
    """A factor's rows in a given order as float32, converted as far as asked (most are never needed), into the
    scratch `name` of the thread that asks (one per input of a layer: the layers of a thread reuse them)."""

    def __init__(self, stored: Stored, order: np.ndarray, name: str) -> None:
        self.stored, self.order, self.name = stored, order, name
        self.ready = 0

    def upto(self, count: int) -> np.ndarray:
        """The first `count` rows in order (and the ones converted before)."""
        values = _scratch(self.name, self.stored.shape, np.float32)
        owners = _buffers.__dict__.setdefault("owners", {})  # ids, not references: a new one starts at 0 anyway
        if owners.get(self.name) != id(self):  # another one wrote there since: convert again
            owners[self.name], self.ready = id(self), 0
        if count > self.ready:
            gathered = np.take(self.stored.data, self.order[self.ready : count], axis=0)
            Stored(gathered, self.stored.dtype).float32(out=values[self.ready : count])
            self.ready = count
        return values


def _measure(stored: Stored, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The squared norms of a factor's vectors (B's rows: axis 0; A's columns: axis 1) and its rank x rank Gram
    matrix, float64, in one pass of cache-sized float32 chunks (the factor is never converted whole). Norms are
    summed in float32 (within BOUND_SLACK) except where that loses bits (tiny or huge values): again in float64."""
    data = stored.data if axis == 0 else stored.data.T
    step = max(1, MEASURE_CHUNK // max(data.shape[1], 1))
    squares, gram = np.empty(data.shape[0], np.float32), np.zeros((data.shape[1], data.shape[1]))
    for start in range(0, data.shape[0], step):
        chunk = Stored(data[start : start + step], stored.dtype)
        values = chunk.float32(out=_scratch("tile", chunk.shape, np.float32))
        np.einsum("ij,ij->i", values, values, out=squares[start : start + step])
        gram += values.T @ values
    exact = squares.astype(np.float64)
    redo = np.flatnonzero(~((squares >= 2.0**-100) & (squares <= 2.0**100)))
    if redo.size:
        values = Stored(data[redo], stored.dtype).float32().astype(np.float64)
        exact[redo] = np.einsum("ij,ij->i", values, values)
    return exact, gram


def _by_norm(squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An order of vectors by their squared norms, largest first to within 0.3%, and for each position the
    largest norm from there on (a bound whatever the order). The order is a radix sort of the float32 squares'
    exponent and 8 bits of mantissa (buckets 0.3% wide), much faster than sorting floats."""
    buckets = (squares.astype(np.float32).view(np.uint32) >> 15).astype(np.uint16)
    order = np.argsort(~buckets, kind="stable")
    norms = np.sqrt(squares[order])
    return order, np.maximum.accumulate(norms[::-1])[::-1]


def _blocks(bounds: np.ndarray, most: int) -> np.ndarray:
    """Where each block of rows starts, `bounds` falling: a new block where the bound falls to another bucket
    BLOCK_SPREAD wide, at a multiple of BLOCK_ROWS (the few largest norms are far apart), and every `most` rows."""
    with np.errstate(divide="ignore"):
        buckets = np.floor(np.log(bounds) / math.log1p(BLOCK_SPREAD))
    changes = np.flatnonzero(buckets[1:] != buckets[:-1]) + 1
    starts = np.concatenate([-(-changes // BLOCK_ROWS) * BLOCK_ROWS, np.arange(0, len(bounds), most)])
    return np.unique(starts[starts < len(bounds)])


def _groups(starts: np.ndarray) -> np.ndarray:
    """Per block, the first block of its group: groups of blocks each at least twice as many rows down as the
    last (a staircase of a few steps, finer where the largest entries are)."""
    first = np.zeros(len(starts), np.int64)
    for block in range(1, len(starts)):
        group = first[block - 1]
        first[block] = block if starts[block] >= 2 * max(starts[group], BLOCK_ROWS) else group
    return first


def topk_abs_sum(factors: Factors, k: int, tile_elements: int = TILE_ELEMENTS) -> float:
    """Sum of the k largest |entries| of scale * B @ A, exactly, computing only the entries that can count."""
    bounds = TopKSum(factors, k, tile_elements)
    while not bounds.exact:
        bounds.refine()
    return bounds.lower


def _trimmed_mean(values: Sequence[float]) -> float:
    ordered = sorted(values)
    cut = int(len(ordered) * TRIM)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


def klora_coefficients(
    sources: Sequence[Source], modules: Sequence[str], selection: Selection
) -> dict[str, dict[str, float]]:
    """Per layer, each input's coefficient under K-LoRA's selection (module docstring); inputs with weight > 0."""
    return _klora(sources, modules, selection)[0]


def _klora(
    sources: Sequence[Source], modules: Sequence[str], selection: Selection
) -> tuple[dict[str, dict[str, float]], dict[tuple[str, str], float]]:
    """`klora_coefficients`, and ||dW||^2 of each (module, input) on the way (from the RMS entries gamma needs)."""
    if selection not in ("hard", "soft"):
        raise FusionError(f"selection must be hard or soft, not {selection!r}")
    present = {m: [s for s in sources if m in s.lora.layers] for m in modules}

    def measure(m: str) -> dict[str, TopKSum]:
        ranks = sorted((s.lora.layers[m].rank for s in present[m]), reverse=True)
        k = ranks[0] * (ranks[1] if len(ranks) > 1 else ranks[0])
        return {s.lora.label: TopKSum(s.lora.layers[m], k, slot=slot) for slot, s in enumerate(present[m])}

    bounds = dict(zip(modules, parallel_map(measure, modules), strict=True))
    energies = {(m, label): b.rms**2 * b.size for m in modules for label, b in bounds[m].items()}
    logs: dict[str, list[float]] = {s.lora.label: [] for s in sources}
    for m in modules:
        values = {label: b.rms for label, b in bounds[m].items()}
        if any(v <= 0 for v in values.values()):
            continue  # a zero update says nothing about a LoRA's scale
        center = sum(math.log(v) for v in values.values()) / len(values)
        for label, v in values.items():
            logs[label].append(math.log(v) - center)
    gamma = {label: math.exp(_trimmed_mean(v)) if v else 1.0 for label, v in logs.items()}
    weights = {s.lora.label: s.weight for s in sources}

    def choose(m: str) -> dict[str, float]:
        layer = bounds.pop(m)
        if selection == "hard":
            return _hard_selection(layer, weights, gamma)
        for b in layer.values():
            while not b.exact:
                b.refine()
        return _select({label: weights[label] * b.lower / gamma[label] for label, b in layer.items()}, selection)

    largest_first = sorted(modules, key=lambda m: -max(b.size for b in bounds[m].values()))
    chosen = dict(zip(largest_first, parallel_map(choose, largest_first), strict=True))
    return {m: chosen[m] for m in modules}, energies


def _hard_selection(bounds: dict[str, TopKSum], weights: dict[str, float], gamma: dict[str, float]) -> dict[str, float]:
    """K-LoRA's hard selection, each score refined only until the winner is proven (module docstring)."""

    def score(label: str, value: float) -> float:
        return weights[label] * value / gamma[label]

    def levels(leading: float, rivals: list[str]) -> dict[str, float]:
        """Per rival, the level to refine to for its upper bound to fall under what loses to a leading score."""
        return {r: bounds[r].level_for(leading * gamma[r] / weights[r] * RIVAL_AIM) for r in rivals}

    def work(targets: dict[str, float]) -> int:
        return sum(bounds[r].work_at(level) - bounds[r].computed for r, level in targets.items())

    for b in bounds.values():
        b.refine()
    gains = dict.fromkeys(bounds, math.inf)  # how much the last refinement raised each score's lower bound
    while True:
        low = {label: score(label, b.lower) for label, b in bounds.items()}
        high = {label: score(label, b.upper) for label, b in bounds.items()}
        leader = max(low, key=low.__getitem__)
        rivals = [label for label in bounds if label != leader and high[label] >= low[leader]]
        if not rivals:
            return {label: float(label == leader) for label in bounds}
        if all(bounds[label].exact for label in (leader, *rivals)):
            winners = _select({label: low[label] for label in (leader, *rivals)}, "hard")
            return {label: winners.get(label, 0.0) for label in bounds}
        open_rivals = [label for label in rivals if not bounds[label].exact]
        targets = levels(low[leader], open_rivals) if gains[leader] < math.inf else {}
        # A step of the leader costs about as many entries as it has computed; it pays when raising its lower bound
        # by about half its last gain spares the rivals more than that (its first step always does).
        if not bounds[leader].exact and (
            not targets
            or work(targets) - work(levels(low[leader] + gains[leader] / 2, open_rivals)) > bounds[leader].computed
        ):
            bounds[leader].refine()
            gains[leader] = score(leader, bounds[leader].lower) - low[leader]
            continue
        for label, level in (targets or levels(low[leader], open_rivals)).items():
            bounds[label].refine(level)


def _select(scores: dict[str, float], selection: Selection) -> dict[str, float]:
    total = sum(scores.values())
    if total <= 0:  # every candidate's update is zero here
        return {label: 1.0 / len(scores) for label in scores}
    if selection == "soft":
        return {label: score / total for label, score in scores.items()}
    top = max(scores.values())
    winners = [label for label, score in scores.items() if score == top]
    return {label: (1.0 / len(winners) if label in winners else 0.0) for label in scores}
