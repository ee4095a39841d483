"""Seconds per training step of the builtin klein LoRA trainer (the README's Benchmarks; never a timed test).

One step is what `train_lora`'s loop does with cached latents and text embeddings: noise, the flow-matching loss
through the transformer with LoRA layers, backward, clipping, an optimizer step. Batch 1, rank 32 on every targetable
linear, Adafactor. On a GPU: the full FLUX.2 [klein] 9B transformer (8 double + 24 single blocks, 4096 hidden) with
random bf16 weights at 1024 px (64x64 latent tokens, 512 text tokens); on a CPU: the tiny test transformer at 64 px.
The write-up (docs/policy.md) reports about 0.84 s/step on an H200 (1000 steps in 14 minutes); the goal is 0.42.

    python bench/train_step.py                       # whatever device is there, every variant
    python bench/train_step.py --variants eager,compile --steps 10 --json out.json

Variants: eager (bf16 base weights, fp32 LoRA under bf16 autocast, SDPA attention), compile (each transformer
block compiled with torch.compile), compile-model (the whole transformer compiled), checkpointing (gradient
checkpointing: less memory, more time), fp8 and fp8-compile (`fp8Base`: the frozen base linears in float8 with
rowwise scales, fp8 matmuls on Hopper; on a CPU the fp8 matmul is emulated and slow).
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
from diffusers import Flux2Transformer2DModel
from kleinstyle.runtime.klein.arch import KLEIN_9B_TRANSFORMER, select_lora_targets
from kleinstyle.runtime.klein.fp8 import base_layers_to_fp8
from kleinstyle.runtime.klein.lora_train import flow_matching_loss
from kleinstyle.runtime.klein.optim import make_optimizer
from kleinstyle.runtime.klein.tiny import TINY_TRANSFORMER
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, also under python -P
from variants import measure_each, write_rows


@dataclass
class Row:
    variant: str
    model: str
    pixels: int
    seconds_per_step: float
    peak_gib: float | None
    loss: float


def build(config: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    with torch.device(device):
        transformer = Flux2Transformer2DModel(**config).to(dtype)
    transformer.requires_grad_(False)
    targets = select_lora_targets(transformer, "all")
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32, as the trainer keeps them
    transformer.train()
    return transformer, params


def measure(variant: str, gpu: bool, steps: int, warmup: int) -> Row:
    device = torch.device("cuda" if gpu else "cpu")
    config, size, tokens = (KLEIN_9B_TRANSFORMER, 1024, 512) if gpu else (TINY_TRANSFORMER, 64, 32)
    transformer, params = build(config, device, torch.bfloat16 if gpu else torch.float32)
    if variant.startswith("fp8"):  # the frozen base linears in float8, the LoRA factors fp32 beside them
        base_layers_to_fp8(transformer)
    if variant == "checkpointing":
        transformer.enable_gradient_checkpointing()
    if variant in ("compile", "fp8-compile"):  # regional: each block, so the 32 blocks share two compiled graphs
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.compile()
    if variant == "compile-model":
        transformer = torch.compile(transformer)
    optimizer, _ = make_optimizer(params, "adafactor", lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    side = size // 16  # VAE /8, then 2x2 patchify
    latents = torch.randn(1, config["in_channels"], side, side, generator=gen).to(device)
    embeds = torch.randn(1, tokens, config["joint_attention_dim"], generator=gen).to(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], torch.tensor(0.0)
    for i in range(warmup + steps):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        noise = torch.randn(latents.shape, generator=gen).to(device)
        sigmas = torch.sigmoid(torch.randn(1, generator=gen)).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = flow_matching_loss(transformer, latents, embeds, noise, sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    del transformer, optimizer, params
    if gpu:
        torch.cuda.empty_cache()
    return Row(variant, "klein-9B" if gpu else "tiny", size, statistics.median(times), peak, float(loss.detach()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="eager,compile,checkpointing,fp8,fp8-compile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="the tiny model on the CPU even when a GPU is there")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print its row as JSON
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    if args.one:
        print(json.dumps(asdict(measure(args.one, gpu, args.steps, args.warmup))))
        return
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} CPU"
    print(f"{machine}, torch {torch.__version__}\n")
    print("| variant | model | px | s/step | peak GiB | vs 0.84 s (document) |\n| --- | --- | --- | --- | --- | --- |")

    def line(row: Row) -> str:
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
        ratio = f"{0.84 / row.seconds_per_step:.2f}x" if gpu else "-"
        return f"| {row.variant} | {row.model} | {row.pixels} | {row.seconds_per_step:.3f} | {peak} | {ratio} |"

    command = ["--steps", str(args.steps), "--warmup", str(args.warmup), *(["--cpu"] if args.cpu else [])]
    rows = measure_each(__file__, args.variants.split(","), command, Row, line, cells=6)
    write_rows(args.json, machine, torch.__version__, rows)


if __name__ == "__main__":
    main()
