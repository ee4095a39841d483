"""`kleinstyle`: one command, a subcommand per step. Each subcommand imports what it needs only when it runs, so
the operator image (no torch) and the runtime image share this entry point."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _operator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable); none: the whole cluster",
    )
    p.add_argument("--config", help="operator configuration file (default: $KLEINSTYLE_OPERATOR_CONFIG)")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL")


def _operator(args: argparse.Namespace) -> int:
    from kleinstyle.operator.config import load_config
    from kleinstyle.operator.main import run_operator

    asyncio.run(run_operator(load_config(args.config), args.namespace, liveness_endpoint=args.liveness))
    return 0


def _crds_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", help="write one YAML file per CRD into DIR")
    group.add_argument("--check", metavar="DIR", help="exit 1 when DIR's CRDs differ from the models")


def _crds(args: argparse.Namespace) -> int:
    from kleinstyle.operator import crdgen

    if args.write:
        for path in crdgen.write_crds(args.write):
            print(path)
        return 0
    if args.check:
        stale = crdgen.stale_crds(args.check)
        for line in stale:
            print(f"stale: {line}", file=sys.stderr)
        if stale:
            print("run `make crds` to regenerate them from operator/api", file=sys.stderr)
        return 1 if stale else 0
    print("---\n".join(crdgen.render_yaml(crd) for crd in crdgen.build_crds().values()), end="")
    return 0


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="path of the RunSpec JSON (the Job mounts it from a ConfigMap)")


def _prepare(args: argparse.Namespace) -> int:
    from kleinstyle.runtime.prepare import main

    return main(args.spec)


def _train(args: argparse.Namespace) -> int:
    from kleinstyle.runtime.train import main

    return main(args.spec)


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
        from kleinstyle.runtime.generate import main

        return main(args.spec)
    needed = (("--model", args.model), ("--prompt", args.prompt), ("-o", args.output))
    missing = [flag for flag, value in needed if not value]
    if missing:
        print(f"kleinstyle generate: {', '.join(missing)} required (or --spec RUNSPEC)", file=sys.stderr)
        return 2
    from kleinstyle.runtime.generate import cli

    return cli(args)


def _tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write it (created; must not hold a pipeline already)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same weights")


def _tiny_model(args: argparse.Namespace) -> int:
    from kleinstyle.runtime.klein.tiny import write_tiny_klein

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
    from kleinstyle.runtime import fuse

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


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stylelora", help="StyleLoRA YAML file")
    p.add_argument("--images", type=int, required=True, help="accepted images on the board")
    p.add_argument(
        "-o",
        "--output",
        choices=("yaml", "json", "aitoolkit"),
        default="yaml",
        help="the whole plan (yaml, json) or the config ai-toolkit would receive (aitoolkit)",
    )
    p.add_argument("--trigger", help="trigger word for the ai-toolkit config (default: the board's name)")
    p.add_argument("--dataset", default="/artifacts/dataset", help="dataset folder in the ai-toolkit config")
    p.add_argument("--training-folder", default="/artifacts/aitoolkit", help="ai-toolkit's output folder")
    p.add_argument("--model-path", help="local model directory (default: the hub name)")


def _plan(args: argparse.Namespace) -> int:

    import yaml
    from kleinstyle.contract.aitoolkit import aitoolkit_config
    from kleinstyle.contract.plan import plan_training
    from kleinstyle.operator.admission import AdmissionRejected, admit, load_manifests

    with open(args.stylelora, encoding="utf-8") as handle:
        docs = [d for d in load_manifests(handle.read()) if d and d.get("kind") == "StyleLoRA"]
    if len(docs) != 1:
        print(f"{args.stylelora}: expected one StyleLoRA, found {len(docs)}", file=sys.stderr)
        return 2
    try:
        obj = admit(docs[0])  # the same defaults and validation the API server applies
        plan = plan_training(args.images, obj["spec"])
    except (AdmissionRejected, ValueError) as exc:
        print(getattr(exc, "message", str(exc)), file=sys.stderr)
        return 2
    if args.output == "json":
        print(plan.model_dump_json(indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False), end="")
    else:
        spec = obj["spec"]
        config = aitoolkit_config(
            plan,
            name=obj["metadata"]["name"],
            dataset_dir=args.dataset,
            training_folder=args.training_folder,
            trigger_word=args.trigger or spec["boardRef"]["name"],
            model=spec["model"]["name"],
            model_path=args.model_path,
        )
        print(yaml.safe_dump(config, sort_keys=False), end="")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _text_command(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """The arguments and the runner of a text-pipeline command, imported only when it runs."""

    def add(p: argparse.ArgumentParser) -> None:
        from kleinstyle.runtime.text import commands

        getattr(commands, f"{name}_args")(p)

    def run(args: argparse.Namespace) -> int:
        from kleinstyle.runtime.text import commands

        return getattr(commands, name)(args)

    return add, run


def _dev_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".kleinstyle-dev", help="folder for volumes, logs and the kubeconfig")
    p.add_argument("--namespace", "-n", default="kleinstyle-demo", help="namespace the operator watches")
    p.add_argument("--apply", "-f", action="append", default=[], help="YAML file or folder to apply at start")


def _dev_cluster(args: argparse.Namespace) -> int:
    from kleinstyle.operator.devcluster.demo import serve

    return asyncio.run(serve(args.root, args.namespace, args.apply))


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".kleinstyle-dev", help="folder for volumes, logs and the kubeconfig")
    p.add_argument("--examples", default="examples", help="folder of YAML to apply")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the resources to settle")


def _demo(args: argparse.Namespace) -> int:
    from kleinstyle.operator.devcluster.demo import demo

    return asyncio.run(demo(args.root, args.examples, args.timeout))


COMMANDS: dict[str, Command] = {
    "operator": ("run the kopf operator", _operator_args, _operator),
    "crds": ("print, write or check the CRDs generated from the resource models", _crds_args, _crds),
    "plan": ("print the training plan of a StyleLoRA for a board of N images", _plan_args, _plan),
    "prepare": ("StyleBoard step: fetch, validate and caption the references into a dataset", _spec_args, _prepare),
    "train": ("StyleLoRA step: train the LoRA of the plan, report progress, publish it", _spec_args, _train),
    "caption": (
        "caption a folder of images, content only, with the trigger word (NAME.txt)",
        *_text_command("caption"),
    ),
    "style-profile": ("extract the L1 STYLE_PROFILE of a folder of references", *_text_command("style_profile")),
    "reformulate": ("rewrite a prompt in a STYLE_PROFILE's style (L2)", *_text_command("reformulate")),
    "generate": (
        "GenerationJob step, or render on this machine: klein + LoRAs -> PNGs with metadata and a contact sheet",
        _generate_args,
        _generate,
    ),
    "tiny-model": (
        "write a tiny random klein pipeline in the diffusers layout (demo, tests, smoke tests)",
        _tiny_model_args,
        _tiny_model,
    ),
    "fuse": ("LoRAFusion step: fuse LoRAs (concat, svd, klora) into one", _fuse_args, _fuse),
    "dev-cluster": (
        "run an embedded cluster (API emulator, operator, local Job executor)",
        _dev_cluster_args,
        _dev_cluster,
    ),
    "demo": ("run the whole flow on the embedded cluster and show where the artifacts are", _demo_args, _demo),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kleinstyle", description="Style LoRAs for FLUX.2 [klein] on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    from kleinstyle.runtime.paths import google_credentials_file

    google_credentials_file()  # a gs:// artifact store's key, from its Secret
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
