"""`kleinstyle train --model DIR --data DIR ...`: the same step as a StyleLoRA's Job, on one machine, without the API.

The reference policy plans the folder's images and the flags given, on the builtin backend, writing under `-o`;
progress goes to stderr instead of status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kleinstyle.contract.layout import WORK_DIR
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_OK
from kleinstyle.contract.reports import TrainResult
from kleinstyle.contract.runspec import EvaluationSpec, Owner, RunSpec, TrainSpec

from ..errors import BadInput
from ..step import Reporter, run_work
from .settings import dataset_folder, train_settings, train_spec


def cli_spec(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of a one-machine run: the reference policy's plan for the folder's images and the flags given,
    on the builtin backend, writing under `-o` (the same code as a StyleLoRA's Job, without the API)."""
    from kleinstyle.contract.plan import plan_training

    from ..klein.dataset import DatasetError, read_dataset

    if not (Path(args.model) / "model_index.json").is_file():
        raise BadInput(f"--model {args.model}: no diffusers pipeline there (model_index.json missing)")
    try:
        images = len(read_dataset(args.data))
    except DatasetError as exc:
        raise BadInput(f"--data: {exc}") from exc
    given = {
        "rank": args.rank,
        "steps": args.steps,
        "resolution": args.resolution,
        "checkpointEvery": args.every,
        "timestepBias": args.timestep_bias,
        "noiseOffset": args.noise_offset,
        "flipHorizontal": args.flip,
        "emaDecay": args.ema_decay,
        "gradientCheckpointing": args.gradient_checkpointing,
    }
    spec = {
        "backend": "builtin",
        "training": {key: value for key, value in given.items() if value is not None},
        "earlyStopping": {"enabled": args.evaluate},
    }
    try:
        plan = plan_training(images, spec)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    output = str(Path(args.output).resolve())
    work = TrainSpec(
        dataset_uri=str(Path(args.data).resolve()),
        trigger_word=args.trigger,
        image_count=images,
        backend="builtin",
        model_path=str(Path(args.model).resolve()),
        plan=plan,
        evaluation=evaluation_spec(args, int(plan.resolution.value)) if args.evaluate else None,
    )
    owner = Owner(kind="StyleLoRA", plural="styleloras", namespace="local", name=Path(output).name, uid="local")
    return RunSpec(owner=owner, output_uri=output, output_display_uri=output, work=work)


def evaluation_spec(args: argparse.Namespace, resolution: int) -> EvaluationSpec:
    """The default probes at no more than the training resolution (as the operator sets them), scored by the model
    folders given (each one missing: a proxy score)."""
    given = {
        "style_embedder_path": args.style_model,
        "text_model_path": args.text_model,
        "embedder_path": args.content_model,
    }
    paths = {key: str(Path(path).resolve()) for key, path in given.items() if path}
    return EvaluationSpec(size=min(EvaluationSpec().size, resolution // 16 * 16), steps=args.probe_steps, **paths)


def training_sizes(spec: RunSpec) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(file, its size, the size it trains at) per image of the run's dataset: never above its own size."""
    from ..klein.dataset import read_dataset, training_size
    from ..klein.encode import load_rgb

    cfg = train_settings(train_spec(spec).plan)
    sizes = []
    for sample in read_dataset(dataset_folder(spec)):
        size = load_rgb(sample.image).size
        sizes.append((sample.image.name, size, training_size(size, cfg.resolution, cfg.bucket_multiple)))
    return sizes


def cli(args: argparse.Namespace) -> int:
    """Train on this machine: print each image's training size and the progress, write the LoRA and its
    checkpoints under `-o`. Exit 2 on bad input, 1 when interrupted (run it again to resume)."""
    from . import work

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = cli_spec(args)
        for name, size, trained in training_sizes(spec):
            note = "" if trained == size else f" (from {size[0]}x{size[1]})"
            print(f"{name}: {trained[0]}x{trained[1]}{note}")
    except BadInput as exc:
        print(f"kleinstyle train: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    shown: list[str] = []

    def show(owner: Any, report: dict[str, Any]) -> bool:
        if report["message"] != (shown[-1] if shown else None):
            shown.append(report["message"])
            print(report["message"], file=sys.stderr, flush=True)
        return True

    outcome = run_work(spec, work, Reporter(spec, send=show))
    if outcome.code != EXIT_OK:
        print(f"kleinstyle train: {outcome.message}", file=sys.stderr)
        return outcome.code
    result = outcome.result
    assert isinstance(result, TrainResult)
    print(f"LoRA: {result.lora_file}" if result.lora_file else "no LoRA: no checkpoint beat the base model")
    print(f"checkpoints: {Path(spec.output_uri) / WORK_DIR / 'checkpoints'}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
