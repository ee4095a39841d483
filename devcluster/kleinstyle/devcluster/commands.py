"""The dev cluster's commands: `kleinstyle dev-cluster` and `kleinstyle demo` (development tools; `make demo`)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _dev_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".kleinstyle-dev", help="folder for volumes, logs and the kubeconfig")
    p.add_argument("--namespace", "-n", default="kleinstyle-demo", help="namespace the operator watches")
    p.add_argument("--apply", "-f", action="append", default=[], help="YAML file or folder to apply at start")
    p.add_argument(
        "--real",
        action="store_true",
        help="the real control plane (make controlplane), a node agent and the chart installed by helm, instead of "
        "the embedded cluster",
    )


def _dev_cluster(args: argparse.Namespace) -> int:
    if args.real:
        from . import real_e2e

        return real_e2e.serve(args.root, args.namespace, args.apply)
    from .demo import serve

    return asyncio.run(serve(args.root, args.namespace, args.apply))


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".kleinstyle-dev", help="folder for volumes, logs and the kubeconfig")
    p.add_argument("--examples", default="examples", help="folder of YAML to apply")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the resources to settle")


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return asyncio.run(demo(args.root, args.examples, args.timeout))


COMMANDS: dict[str, Command] = {
    "dev-cluster": (_dev_cluster_args, _dev_cluster),
    "demo": (_demo_args, _demo),
}
