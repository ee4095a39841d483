"""The operator's commands: `kleinstyle operator`, `crds` and `plan`. Arguments only here; what runs is imported
when the command runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from .logs import FORMAT_ENV, FORMATS, LEVEL_ENV, LEVELS

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


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
    _choice(p, "--log-level", LEVELS, LEVEL_ENV, "INFO", "least severe records logged")
    _choice(p, "--log-format", FORMATS, FORMAT_ENV, "json", "one JSON object or one line of text per record, on stderr")


def _choice(p: argparse.ArgumentParser, flag: str, choices: tuple[str, ...], env: str, default: str, what: str) -> None:
    """A flag taking one of `choices` (any case), its default from `env`, else `default`."""
    p.add_argument(
        flag,
        type=_one_of(choices, env),
        default=os.environ.get(env, default),
        metavar="{" + ",".join(choices) + "}",
        help=f"{what} (default: ${env}, else {default})",
    )


def _one_of(choices: tuple[str, ...], env: str) -> Callable[[str], str]:
    """An argparse type accepting `choices` in any case. argparse converts a string default too, so a bad value in
    `env` is refused as a bad flag would be, not found later."""
    by_key = {choice.lower(): choice for choice in choices}

    def parse(value: str) -> str:
        try:
            return by_key[value.lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"{value!r} (or ${env}) is not one of {', '.join(choices)}") from None

    return parse


def _operator(args: argparse.Namespace) -> int:
    from kleinstyle.contract.pod import local_path

    from . import logs
    from .config import CONFIG_ENV, load_config
    from .main import run_operator

    logs.setup(args.log_level, args.log_format)
    # A pod path (the chart mounts the file at /etc/kleinstyle): where the pod's files are when it runs as a process.
    config_path = args.config or os.environ.get(CONFIG_ENV)
    cfg = load_config(local_path(config_path) if config_path else None)
    asyncio.run(run_operator(cfg, args.namespace, liveness_endpoint=args.liveness))
    return 0


def _crds_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", help="write one YAML file per CRD into DIR")
    group.add_argument("--check", metavar="DIR", help="exit 1 when DIR's CRDs differ from the models")


def _crds(args: argparse.Namespace) -> int:
    from . import crdgen

    if args.write:
        for path in crdgen.write_crds(args.write):
            print(path)
        return 0
    if args.check:
        stale = crdgen.stale_crds(args.check)
        for line in stale:
            print(f"stale: {line}", file=sys.stderr)
        if stale:
            print("run `make crds` to regenerate them from kleinstyle.operator.api", file=sys.stderr)
        return 1 if stale else 0
    print("---\n".join(crdgen.render_yaml(crd) for crd in crdgen.build_crds().values()), end="")
    return 0


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
    from .plan_command import plan

    return plan(args)


COMMANDS: dict[str, Command] = {
    "operator": (_operator_args, _operator),
    "crds": (_crds_args, _crds),
    "plan": (_plan_args, _plan),
}
