"""What the GPU benchmarks share: each variant measured in a process of its own (compiled and eager runs in one
process crashed inductor with torch 2.11), its row printed as it arrives, and the rows written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

Row = TypeVar("Row")


def measure_each(
    script: str, variants: list[str], args: list[str], row: Callable[..., Row], line: Callable[[Row], str], cells: int
) -> list[Row]:
    """Run `script --one VARIANT ARGS` per variant; its last stdout line is the row as JSON. A failed variant
    prints its last error line in a table row of `cells` cells and is left out."""
    rows = []
    for variant in variants:
        done = subprocess.run([sys.executable, script, "--one", variant, *args], capture_output=True, text=True)
        if done.returncode != 0:
            failed = f"| {variant} | failed: {done.stderr.strip().splitlines()[-1:]} |"
            print(failed + " |" * (cells - 2), flush=True)
            continue
        rows.append(row(**json.loads(done.stdout.strip().splitlines()[-1])))
        print(line(rows[-1]), flush=True)
    return rows


def write_rows(path: str | None, machine: str, torch_version: str, rows: list[Any]) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump({"machine": machine, "torch": torch_version, "rows": [asdict(r) for r in rows]}, handle)
