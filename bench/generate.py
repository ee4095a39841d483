"""Seconds per generated image of klein (the README's generation benchmark; never a timed test).

One image is what a GenerationJob does per seed once its prompts are encoded: 50 flow-matching steps with real CFG
(guidance 4.0) through the transformer, then the VAE decode, at 2048x2048. On a GPU: the full FLUX.2 [klein] 9B
transformer built from its diffusers config (`arch.KLEIN_9B_TRANSFORMER`) and the real VAE config, random bf16
weights (LoRAs are fused into the weights before sampling, so they cost nothing here), random prompt embeddings
(512 tokens x 12288). On a CPU: the tiny test pipeline at 128 px. Either way it runs the runtime's own sampler
(`klein.generate.prepared` + `Sampler.render`). The text encoder is not timed: it runs once per prompt, and is
freed before the transformer loads. Goal: at most 60 s per image on an H200.

    python bench/generate.py                                   # every variant, on CUDA when there is one
    python bench/generate.py --variants eager,fp8-compile --images 2 --json out.json
    python bench/generate.py --device cpu                      # the tiny pipeline

Variants: two-pass-cfg (the conditional and unconditional passes one after the other, as diffusers' pipeline runs
them), eager (both passes in one batch-2 call; SDPA attention, which takes the fused flash kernel on Hopper),
compile (eager + each block compiled with torch.compile), fp8 (fp8 block linears through torch._scaled_mm),
fp8-compile. Each variant runs in its own process (the training benchmark saw inductor crash when compiled and
eager runs shared one).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from kleinstyle.runtime.klein.arch import KLEIN_9B_TRANSFORMER
from kleinstyle.runtime.klein.generate import RenderOptions, prepared
from kleinstyle.runtime.klein.tiny import klein_scheduler, tiny_klein_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, also under python -P
from variants import measure_each, write_rows

VARIANTS = {
    "two-pass-cfg": {"compile": False, "batch_cfg": False},
    "eager": {"compile": False},
    "compile": {"compile": True},
    "fp8": {"compile": False, "fp8": True},
    "fp8-compile": {"compile": True, "fp8": True},
}
GOAL_S = 60.0


@dataclass
class Row:
    variant: str
    model: str
    pixels: int
    steps: int
    seconds_per_image: float
    first_image_s: float  # includes compilation
    peak_gib: float | None


def build(gpu: bool) -> Flux2KleinPipeline:
    """The pipeline without its text encoder: random klein 9B in bf16 on the GPU, or the tiny one on the CPU."""
    if not gpu:
        pipe = tiny_klein_pipeline()
        pipe.text_encoder = pipe.tokenizer = None
        return pipe
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # no 36 GB float32 detour for 9B parameters
    try:
        with torch.device("cuda"):
            transformer = Flux2Transformer2DModel(**KLEIN_9B_TRANSFORMER)
            vae = AutoencoderKLFlux2()  # its defaults are klein's VAE
    finally:
        torch.set_default_dtype(default)
    return Flux2KleinPipeline(
        scheduler=klein_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )


def measure(variant: str, gpu: bool, size: int, steps: int, images: int, warmup: int) -> Row:
    device = torch.device("cuda" if gpu else "cpu")
    pipe = build(gpu)
    sampler = prepared(pipe, device, RenderOptions(device=device.type, **VARIANTS[variant]))
    features = pipe.transformer.config.joint_attention_dim
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    prompt, negative = (torch.randn(1, 512, features, generator=generator).to(device, dtype) for _ in range(2))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + images):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler.render(prompt, negative, seed=index, width=size, height=size, steps=steps, guidance=4.0)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    model = "klein-9B" if gpu else "tiny"
    measured = times[warmup:] or times
    return Row(variant, model, size, steps, statistics.median(measured), times[0], peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    parser.add_argument("--size", type=int, help="pixels per side (default: 2048 on CUDA, 128 on the CPU)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=1, help="timed images per variant (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first (compilation, caches)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print its row as JSON
    args = parser.parse_args()
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    size = args.size or (2048 if gpu else 128)
    if args.one:
        print(json.dumps(asdict(measure(args.one, gpu, size, args.steps, args.images, args.warmup))))
        return
    # On the CPU, compile is a no-op in the runtime (CUDA only): those rows would repeat eager's.
    variants = (args.variants or ",".join(VARIANTS if gpu else ("two-pass-cfg", "eager", "fp8"))).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} CPU"
    print(f"{machine}, torch {torch.__version__}, {size}x{size}, {args.steps} steps, CFG 4.0\n")
    print("| variant | model | px | s/image | first image s | peak GiB | vs 60 s goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    command = ["--device", "cuda" if gpu else "cpu", "--size", str(size), "--steps", str(args.steps)]
    command += ["--images", str(args.images), "--warmup", str(args.warmup)]

    def line(row: Row) -> str:
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
        goal = f"{GOAL_S / row.seconds_per_image:.2f}x" if gpu else "-"
        return (
            f"| {row.variant} | {row.model} | {row.pixels} | {row.seconds_per_image:.2f} | {row.first_image_s:.1f} "
            f"| {peak} | {goal} |"
        )

    rows = measure_each(__file__, variants, command, Row, line, cells=7)
    write_rows(args.json, machine, torch.__version__, rows)


if __name__ == "__main__":
    main()
