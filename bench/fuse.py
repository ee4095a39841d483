"""LoRA fusion at klein 9B shapes: `kleinstyle fuse` against a straightforward exact fusion (README: fusion).

Three random rank-32 LoRAs on all 144 LoRA-targetable linears of FLUX.2 [klein] 9B (8 double + 24 single blocks,
4096 hidden; the shapes come from the diffusers config, nothing is allocated), bfloat16, in the artifact format,
fused to rank 32 with `svd`. Both sides run as whole processes (wall time from spawn to exit, peak RSS of that
process) and in-process (after imports), side by side, alternating, with the page cache warm for both.

The baseline is the textbook exact method: safetensors `load_file`, then per layer, one after another, in float32,
QR of the stacked B = [w_i B_i] and of the stacked A^T, an SVD of the small core R_B R_A^T, the top 32 triplets,
and `save_file`. Goals, each figure a ratio to the baseline of the same run: `--method svd` at most 0.2 of the
baseline's whole-process time; `--method klora` (hard selection, weights 1, 0.7 and 0.5) at most 3 s as a whole
process. Both exact: svd's result against the baseline's (B @ A on two layers); K-LoRA's top-K sums and selection
on three layers (one of each size class) against the previous algorithm, torch computing every entry in bfloat16.
Peak RSS counts the pages of the memory-mapped inputs that were read (shared with the page cache).

    python -P bench/fuse.py --methods svd,klora  # 3 rounds, a table and the goals
    python -P bench/fuse.py --rounds 5 --methods svd,concat,klora --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RANK = 32
WEIGHTS = (1.0, 0.7, 0.5)
SVD_GOAL = 0.2  # of the baseline's whole-process time
KLORA_GOAL = 3.0  # seconds, whole process
KLORA_CHECKED = (  # one layer of each size class checked against the previous algorithm
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.3.ff.linear_in",
    "single_transformer_blocks.9.attn.to_qkv_mlp_proj",
)


def make_inputs(folder: Path, seed: int = 0) -> list[Path]:
    """Three random rank-32 bf16 LoRAs over klein 9B's linears (flat spectra: the worst case for truncation)."""
    from kleinstyle.runtime.klein.arch import KLEIN_SIZES, block_linear_shapes
    from kleinstyle.runtime.klein.tensorfile import Stored, write_safetensors

    shapes = block_linear_shapes(**KLEIN_SIZES["klein-9b"])
    paths = []
    for index in range(3):
        g = torch.Generator().manual_seed(seed + index)
        state = {}
        for module, (rows, cols) in shapes.items():
            A = (torch.randn(RANK, cols, generator=g) / cols**0.5).bfloat16()
            B = (0.01 * torch.randn(rows, RANK, generator=g)).bfloat16()
            state[f"transformer.{module}.lora_A.weight"] = Stored.from_torch(A)
            state[f"transformer.{module}.lora_B.weight"] = Stored.from_torch(B)
        path = folder / f"style-{index}.safetensors"
        write_safetensors(path, state, {"format": "pt"})
        paths.append(path)
    return paths


def baseline(inputs: list[str], weights: list[float], rank: int, output: str) -> None:
    """The straightforward exact fusion (module docstring)."""
    from safetensors.torch import load_file, save_file

    states = [load_file(path) for path in inputs]
    result = {}
    for key_a in sorted(k for k in states[0] if k.endswith(".lora_A.weight")):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        dtype = states[0][key_b].dtype
        B = torch.cat([w * s[key_b].float() for s, w in zip(states, weights, strict=True)], dim=1)
        A = torch.cat([s[key_a].float() for s in states], dim=0)
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.T)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
        result[key_b] = ((Qb @ U[:, :rank]) * S[:rank]).to(dtype).contiguous()
        result[key_a] = (Vh[:rank] @ Qa.T).to(dtype).contiguous()
    save_file(result, output, metadata={"format": "pt"})


def ours(inputs: list[str], weights: list[float], rank: int | None, output: str, method: str) -> None:
    from kleinstyle.runtime.fuse import main_cli

    items = [f"{path}:{weight}" for path, weight in zip(inputs, weights, strict=True)]
    code = main_cli(items, output, method, rank=rank, energy=None, selection="hard", dtype=None, per_layer=False)
    if code:
        raise SystemExit(f"kleinstyle fuse exited {code}")


def command(variant: str, inputs: list[Path], output: Path) -> list[str]:
    """The whole-process command line of a variant."""
    files = [f"{path}:{weight}" for path, weight in zip(inputs, WEIGHTS, strict=True)]
    if variant == "baseline":
        return [sys.executable, "-P", __file__, "--run-baseline", "-o", str(output), *files]
    method = variant.split()[-1]
    script = shutil.which("kleinstyle", path=str(Path(sys.executable).parent))
    entry = [script] if script else [sys.executable, "-P", "-m", "kleinstyle.cli.main"]
    size = ["--rank", str(RANK)] if method != "concat" else []
    return [*entry, "fuse", "--method", method, *size, "-o", str(output), *files]


# Spawns the measured command and reports its wall time and peak RSS. A small process of its own: Linux carries the
# spawning process's peak RSS over into a child's (vfork/exec), so spawning from this large process would not do.
LAUNCHER = """
import os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status))
"""


def run_process(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one whole process."""
    seconds, mib, code = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    if int(code):
        raise SystemExit(f"{' '.join(argv)} exited {code}")
    return float(seconds), float(mib)


def run_in_process(variant: str, inputs: list[Path], output: Path) -> float:
    files = [str(p) for p in inputs]
    started = time.perf_counter()
    if variant == "baseline":
        baseline(files, list(WEIGHTS), RANK, str(output))
    else:
        method = variant.split()[-1]
        ours(files, list(WEIGHTS), None if method == "concat" else RANK, str(output), method)
    return time.perf_counter() - started


def agreement(ours_path: Path, baseline_path: Path) -> float:
    """Largest relative difference of B @ A between the two results over a few layers (dense, small ones)."""
    from kleinstyle.runtime.klein.lora_io import read_lora

    mine, theirs = read_lora(ours_path), read_lora(baseline_path)
    worst = 0.0
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.7.attn.to_add_out"):
        a, b = mine.layers[module].delta(), theirs.layers[module].delta()
        worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return worst


def klora_agreement(inputs: list[Path]) -> tuple[float, bool]:
    """(largest relative difference of a top-K sum, whether the hard selection is the same) between kleinstyle's
    K-LoRA and the previous algorithm on KLORA_CHECKED: torch computing every entry in the factors' bfloat16, the
    K largest summed, gamma from each layer's RMS entry (over these layers, as klora_coefficients is given them)."""
    from kleinstyle.runtime.klein.lora_fuse import Source, klora_coefficients, topk_abs_sum
    from kleinstyle.runtime.klein.lora_io import read_lora

    loras = [read_lora(path) for path in inputs]
    chosen = klora_coefficients(
        [Source(lora, weight) for lora, weight in zip(loras, WEIGHTS, strict=True)], list(KLORA_CHECKED), "hard"
    )
    worst, sums, logs = 0.0, {}, {}
    for module in KLORA_CHECKED:
        for lora in loras:
            f = lora.layers[module]
            product = f.B.to_torch() @ f.A.to_torch()
            sums[module, lora.label] = float(product.abs().flatten().topk(RANK * RANK).values.double().sum())
            logs[module, lora.label] = 0.5 * math.log(float(product.float().square().mean()))
            ours = topk_abs_sum(f, RANK * RANK)
            worst = max(worst, abs(ours - sums[module, lora.label]) / sums[module, lora.label])
    log_gamma = {
        lora.label: statistics.mean(
            logs[m, lora.label] - statistics.mean(logs[m, other.label] for other in loras) for m in KLORA_CHECKED
        )
        for lora in loras
    }
    same = True
    for module in KLORA_CHECKED:
        scores = {
            lora.label: weight * sums[module, lora.label] / math.exp(log_gamma[lora.label])
            for lora, weight in zip(loras, WEIGHTS, strict=True)
        }
        winners = [label for label, score in scores.items() if score == max(scores.values())]
        same &= chosen[module] == {label: (1 / len(winners) if label in winners else 0.0) for label in scores}
    return worst, same


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each variant (alternating)")
    parser.add_argument("--methods", default="svd", help="kleinstyle methods to time: svd, concat, klora")
    parser.add_argument("--workdir", help="keep the generated inputs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--run-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-o", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_baseline:  # the baseline's own process
        paths = [i.rpartition(":")[0] for i in args.inputs]
        baseline(paths, [float(i.rpartition(":")[2]) for i in args.inputs], RANK, args.o)
        return 0

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="kleinstyle-bench-fuse-"))
    folder.mkdir(parents=True, exist_ok=True)
    inputs = sorted(folder.glob("style-*.safetensors")) or make_inputs(folder)
    for path in inputs:  # warm the page cache for every variant alike
        path.read_bytes()
    variants = ["baseline", *(f"kleinstyle fuse {m}" for m in args.methods.split(","))]
    outputs = {v: folder / f"out-{v.split()[-1]}.safetensors" for v in variants}
    process: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    inproc: dict[str, list[float]] = {v: [] for v in variants}
    run_in_process(variants[-1], inputs, outputs[variants[-1]])  # imports and first-call costs, not measured
    for round_ in range(args.rounds):
        for variant in variants:
            process[variant].append(run_process(command(variant, inputs, outputs[variant])))
            inproc[variant].append(run_in_process(variant, inputs, outputs[variant]))
            whole, inside = process[variant][-1][0], inproc[variant][-1]
            print(f"round {round_ + 1}: {variant}: {whole:.2f} s whole, {inside:.2f} s in-process", file=sys.stderr)
    base = statistics.median(s for s, _ in process["baseline"])
    rows = []
    for variant in variants:
        walls = sorted(s for s, _ in process[variant])
        rows.append(
            {
                "variant": variant,
                "whole_s_median": statistics.median(walls),
                "whole_s_min": walls[0],
                "whole_s_max": walls[-1],
                "in_process_s_median": statistics.median(inproc[variant]),
                "in_process_s_min": min(inproc[variant]),
                "peak_rss_mib": max(m for _, m in process[variant]),
                "vs_baseline": statistics.median(walls) / base,
            }
        )
    machine = (
        f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    print(f"\n{machine}; {args.rounds} rounds; inputs {sum(p.stat().st_size for p in inputs) / 2**20:.0f} MiB bf16")
    print("| variant | whole process (median, min-max) | in-process (median, min) | peak RSS | vs baseline |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['whole_s_median']:.2f} s ({r['whole_s_min']:.2f}-{r['whole_s_max']:.2f}) "
            f"| {r['in_process_s_median']:.2f} s ({r['in_process_s_min']:.2f}) | {r['peak_rss_mib']:.0f} MiB "
            f"| {r['vs_baseline']:.2f} |"
        )
    goals = {}
    by_variant = {r["variant"]: r for r in rows}
    if "kleinstyle fuse svd" in by_variant:
        difference = agreement(outputs["kleinstyle fuse svd"], outputs["baseline"])
        ratio = by_variant["kleinstyle fuse svd"]["vs_baseline"]
        goals["svd"] = {"vs_baseline": ratio, "met": ratio <= SVD_GOAL, "difference": difference}
        print(
            f"\nsvd: {ratio:.2f} of the baseline's whole process (goal <= {SVD_GOAL}): "
            f"{'met' if ratio <= SVD_GOAL else 'NOT met'}; result vs baseline (B @ A on two 4096x4096 layers) "
            f"{difference:.1e} relative difference (bf16 rounding)"
        )
    if "kleinstyle fuse klora" in by_variant:
        worst, same = klora_agreement(inputs)
        row = by_variant["kleinstyle fuse klora"]
        seconds, met = row["whole_s_median"], row["whole_s_median"] <= KLORA_GOAL
        goals["klora"] = {"whole_s": seconds, "vs_baseline": row["vs_baseline"], "met": met, "sums": worst}
        print(
            f"klora: {seconds:.2f} s whole process, {row['vs_baseline']:.2f} of the baseline (goal <= "
            f"{KLORA_GOAL:g} s): {'met' if met else 'NOT met'}; vs every entry in torch on {len(KLORA_CHECKED)} "
            f"layers: top-K sums within {worst:.1e}, hard selection {'the same' if same else 'DIFFERENT'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows, "goals": goals}, indent=2))
    if not args.workdir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
