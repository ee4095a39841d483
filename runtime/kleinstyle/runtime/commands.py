"""The runtime's commands: a step in its Job (`prepare|train|generate|fuse --spec RUNSPEC`) and the same work on one
machine (`generate`, `fuse`, `caption`, `style-profile`, `reformulate`, `tiny-model`). Arguments only here: what a
command runs (torch, PIL, the text providers) is imported when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _with_credentials(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Before any runtime command: a gs:// artifact store's key, from its Secret, as the file gcsfs reads."""

    def wrapped(args: argparse.Namespace) -> int:
        from .paths import google_credentials_file

        google_credentials_file()
        return run(args)

    return wrapped


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="path of the RunSpec JSON (the Job mounts it from a ConfigMap)")


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import main

    return main(args.spec)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="RunSpec JSON (a StyleLoRA's pod); without it, train on this machine:")
    p.add_argument("--model", metavar="DIR", help="local model directory in the diffusers layout (never a hub name)")
    p.add_argument("--data", metavar="DIR", help="dataset folder: images with NAME.txt captions beside them")
    p.add_argument("--trigger", help="the trigger word the captions start with")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the reference policy's for the folder's size)")
    p.add_argument("--steps", type=int, help="training steps (default: the policy's formula)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels, a multiple of 32 (default 1024)")
    p.add_argument("--checkpoint-every", dest="every", type=int, help="steps between checkpoints")
    p.add_argument("--timestep-bias", choices=("balanced", "style", "content"), help="ai-toolkit's content_or_style")
    p.add_argument("--noise-offset", type=float, help="ai-toolkit's noise_offset, 0 to 1")
    p.add_argument("--flip", action="store_true", default=None, help="train every reference and its mirror image")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the LoRA weights (the checkpoints hold it)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower steps")
    p.add_argument("--evaluate", action="store_true", help="score checkpoints and stop early (slow on a CPU)")
    models = "model folder in the transformers layout; without it the score is a proxy and nothing stops early"
    p.add_argument("--style-model", metavar="DIR", help=f"with --evaluate: CSD for the style score ({models})")
    p.add_argument("--text-model", metavar="DIR", help=f"with --evaluate: CLIP or SigLIP for adherence ({models})")
    p.add_argument("--content-model", metavar="DIR", help=f"with --evaluate: DINOv2 for leakage ({models})")
    p.add_argument("--probe-steps", type=int, default=20, help="with --evaluate: steps of each probe render")
    p.add_argument("-o", "--output", metavar="OUT", help="folder for the LoRA and its checkpoints")


def _train(args: argparse.Namespace) -> int:
    if args.spec:
        from .train import main

        return main(args.spec)
    needed = (("--model", args.model), ("--data", args.data), ("--trigger", args.trigger), ("-o", args.output))
    if _missing("train", needed):
        return 2
    from .train.cli import cli

    return cli(args)


def _missing(command: str, needed: tuple[tuple[str, object], ...]) -> bool:
    """Say which flags a run on this machine lacks (none are needed with --spec); True when some are missing."""
    missing = [flag for flag, value in needed if not value]
    if missing:
        print(f"kleinstyle {command}: {', '.join(missing)} required (or --spec RUNSPEC)", file=sys.stderr)
    return bool(missing)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="RunSpec JSON (a GenerationJob's pod); without it, render on this machine:")
    p.add_argument("--model", metavar="DIR", help="local model directory in the diffusers layout (never a hub name)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="LoRA file (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for CFG (default: empty)")
    p.add_argument("--trigger", action="append", default=[], help="trigger word to put in front of each prompt")
    p.add_argument("--no-trigger", action="store_true", help="do not add the trigger words found in LoRA sidecars")
    p.add_argument("--width", type=int, default=2048, help="pixels, a multiple of 16 (default 2048)")
    p.add_argument("--height", type=int, default=2048, help="pixels, a multiple of 16 (default 2048)")
    p.add_argument("--steps", type=int, help="inference steps (default: 50 for a Base model, 4 distilled)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: 4.0 for a Base model, 1.0 distilled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--count", type=int, default=1, help="images per prompt")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="folder for the images and the contact sheet")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--fp8", action="store_true", help="fp8 block linears (Hopper GPUs; faster, slightly lossy)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the blocks (CUDA only anyway)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less memory, for big sizes)")


def _generate(args: argparse.Namespace) -> int:
    if args.spec:
        from .generate import main

        return main(args.spec)
    needed = (("--model", args.model), ("--prompt", args.prompt), ("-o", args.output))
    if _missing("generate", needed):
        return 2
    from .generate import cli

    return cli(args)


def _tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write it (created; must not hold a pipeline already)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same weights")


def _tiny_model(args: argparse.Namespace) -> int:
    from .klein.tiny import write_tiny_klein

    try:
        path = write_tiny_klein(args.directory, seed=args.seed)
    except (FileExistsError, OSError) as exc:
        print(f"kleinstyle tiny-model: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="IN.safetensors[:WEIGHT]", help="LoRAs to fuse (weight 1.0 if omitted)")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="where to write the fused LoRA")
    p.add_argument("--method", choices=("concat", "svd", "klora"), default="svd", help="default: svd")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="svd/klora: the fused rank (default: the largest input rank)")
    size.add_argument("--energy", type=float, help="svd/klora: per layer, the smallest rank keeping this fraction")
    p.add_argument("--selection", choices=("hard", "soft"), default="hard", help="klora: one LoRA per layer or a mix")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: the inputs' dtype")
    p.add_argument("--layers", action="store_true", help="print every layer's rank and energy kept")
    p.add_argument("--spec", help="a LoRAFusion Job's RunSpec JSON instead of the arguments above")


def _fuse(args: argparse.Namespace) -> int:
    from . import fuse

    if args.spec:
        if args.inputs or args.output:
            print(
                "kleinstyle fuse: --spec takes its inputs and output from the RunSpec; give no files", file=sys.stderr
            )
            return 2
        return fuse.main(args.spec)
    if len(args.inputs) < 2 or not args.output:
        print("kleinstyle fuse: give at least two LoRA files and -o OUT.safetensors (or --spec)", file=sys.stderr)
        return 2
    return fuse.main_cli(
        args.inputs,
        args.output,
        args.method,
        rank=args.rank,
        energy=args.energy,
        selection=args.selection,
        dtype=args.dtype,
        per_layer=args.layers,
    )


def _text_command(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """The arguments and the runner of a text-pipeline command, imported only when it runs."""

    def add(p: argparse.ArgumentParser) -> None:
        from .text import commands

        getattr(commands, f"{name}_args")(p)

    def run(args: argparse.Namespace) -> int:
        from .text import commands

        code: int = getattr(commands, name)(args)
        return code

    return add, run


def _models_args(p: argparse.ArgumentParser) -> None:
    from .models.cli import models_args

    models_args(p)


def _models(args: argparse.Namespace) -> int:
    from .models.cli import models

    return models(args)


COMMANDS: dict[str, Command] = {
    name: (add, _with_credentials(run))
    for name, (add, run) in {
        "prepare": (_spec_args, _prepare),
        "train": (_train_args, _train),
        "caption": _text_command("caption"),
        "style-profile": _text_command("style_profile"),
        "reformulate": _text_command("reformulate"),
        "generate": (_generate_args, _generate),
        "tiny-model": (_tiny_model_args, _tiny_model),
        "fuse": (_fuse_args, _fuse),
        "models": (_models_args, _models),
    }.items()
}
