"""What `kleinstyle operator ARGS` parses to, without running the operator."""

from __future__ import annotations

import argparse

import pytest
from kleinstyle.cli import main as cli
from kleinstyle.operator import commands


def operator_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The arguments the `kleinstyle` command line `argv` (starting with `operator`) hands to the operator."""
    seen: list[argparse.Namespace] = []
    add_args, _ = commands.COMMANDS["operator"]
    monkeypatch.setitem(commands.COMMANDS, "operator", (add_args, lambda args: seen.append(args) or 0))
    assert cli.main(argv) == 0
    return seen[-1]
