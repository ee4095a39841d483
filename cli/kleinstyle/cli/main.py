"""`kleinstyle COMMAND`: one entry point for the operator's, the runtime's and the dev cluster's commands.

Each command lives with its side (`kleinstyle.operator.commands`, `kleinstyle.runtime.commands`,
`kleinstyle.devcluster.commands`) and is imported only when it runs: the operator image has no torch, PIL or dev
cluster, the runtime image no kopf, and `kleinstyle --help` needs none of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# What each side's `commands.COMMANDS` maps a command's name to: (add its arguments to a parser, run it).
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

OPERATOR, RUNTIME, DEVCLUSTER = "kleinstyle.operator", "kleinstyle.runtime", "kleinstyle.devcluster"
# name: (the side whose `commands` module has it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": (OPERATOR, "run the kopf operator"),
    "crds": (OPERATOR, "print, write or check the CRDs generated from the resource models"),
    "plan": (OPERATOR, "print the training plan of a StyleLoRA for a board of N images"),
    "prepare": (RUNTIME, "StyleBoard step: fetch, validate and caption the references into a dataset"),
    "train": (RUNTIME, "StyleLoRA step: train the LoRA of the plan, report progress, publish it"),
    "caption": (RUNTIME, "caption a folder of images, content only, with the trigger word (NAME.txt)"),
    "style-profile": (RUNTIME, "extract the L1 STYLE_PROFILE of a folder of references"),
    "reformulate": (RUNTIME, "rewrite a prompt in a STYLE_PROFILE's style (L2)"),
    "generate": (
        RUNTIME,
        "GenerationJob step, or render on this machine: klein + LoRAs -> PNGs with metadata and a contact sheet",
    ),
    "tiny-model": (RUNTIME, "write a tiny random klein pipeline in the diffusers layout (demo, tests, smoke tests)"),
    "fuse": (RUNTIME, "LoRAFusion step: fuse LoRAs (concat, svd, klora) into one"),
    "models": (RUNTIME, "pull the base model and the evaluation models into a model cache (pinned, verified)"),
    "dev-cluster": (DEVCLUSTER, "run an embedded cluster (API emulator, operator, local Job executor)"),
    "demo": (DEVCLUSTER, "run the whole flow on the embedded cluster and show where the artifacts are"),
}
MISSING = {
    OPERATOR: "the operator extra: pip install 'kleinstyle[operator]'",
    RUNTIME: "the runtime extra: pip install 'kleinstyle[runtime]'",
    DEVCLUSTER: "the dev cluster: pip install -e ./devcluster from a checkout (make demo does it)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kleinstyle", description="Style LoRAs for FLUX.2 [klein] on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    if chosen in COMMANDS:
        side = COMMANDS[chosen][0]
        try:
            commands: dict[str, Command] = importlib.import_module(f"{side}.commands").COMMANDS
            add_arguments, run = commands[chosen]
            add_arguments(parsers[chosen])
        except ImportError as exc:
            print(f"kleinstyle {chosen} needs {MISSING[side]} ({exc})", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
