"""The import rules hold and can fail, and the operator starts where only the operator extra is installed.

`make test` runs `lint-imports` on the tree as it is; these tests plant a violation in a copy of the sources and
show that the same rules refuse it, and start the operator's entry point in an interpreter that refuses everything
the operator image lacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "operator", "runtime", "cli", "devcluster")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_copy(tmp_path: Path, plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contracts on a copy of the sources, with `plant` = (file, line) added."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / "kleinstyle" / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if plant is not None:
        path = tmp_path / "kleinstyle" / plant[0]
        path.write_text(path.read_text() + f"\n{plant[1]}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, not the installed project
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_import_rules_hold(tmp_path: Path) -> None:
    done = lint_copy(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("plant", "broken", "shown"),
    [
        (
            ("operator/reconcile.py", "import kleinstyle.runtime.prepare"),
            "operator and runtime never import each other",
            "kleinstyle.operator.reconcile -> kleinstyle.runtime.prepare",
        ),
        (
            ("runtime/train.py", "from kleinstyle.operator.kinds import KIND_RUNS"),
            "operator and runtime never import each other",
            "kleinstyle.runtime.train -> kleinstyle.operator.kinds",
        ),
        (
            ("contract/plan.py", "import torch"),
            "the contract imports nothing heavier than pydantic",
            "kleinstyle.contract.plan -> torch",
        ),
        (
            ("operator/handlers.py", "from PIL import Image"),
            "the operator image has no torch, PIL",
            "kleinstyle.operator.handlers -> PIL",
        ),
    ],
)
def test_a_violation_fails_the_rules(tmp_path: Path, plant: tuple[str, str], broken: str, shown: str) -> None:
    done = lint_copy(tmp_path, plant)
    assert done.returncode == 1, done.stdout
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout
    assert shown in done.stdout


REFUSE = """
import importlib.abc, sys
HEAVY = ("PIL", "torch", "numpy", "diffusers", "transformers", "peft", "safetensors", "httpx", "kmock", "fsspec")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY or name.startswith(("google.genai", "kleinstyle.devcluster")):
            raise ImportError("not in the operator image: " + name)
sys.meta_path.insert(0, Refuse())
"""


def run_refusing(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-c", REFUSE + code], cwd="/", capture_output=True, text=True, timeout=120
    )


def test_the_operator_starts_without_what_its_image_lacks() -> None:
    done = run_refusing("import kleinstyle.operator.main, kleinstyle.operator.commands")
    assert done.returncode == 0, done.stderr
    done = run_refusing("from kleinstyle.cli.main import main; sys.exit(main(['operator', '--help']))")
    assert done.returncode == 0, done.stderr
    assert "--namespace" in done.stdout and "--liveness" in done.stdout
    # The refusal is real: the runtime's steps cannot load there.
    done = run_refusing("from kleinstyle.cli.main import main; sys.exit(main(['prepare', '--help']))")
    assert done.returncode == 0 and "--spec" in done.stdout  # arguments need nothing heavy
    done = run_refusing("import kleinstyle.runtime.prepare")
    assert done.returncode == 1 and "ImportError: not in the operator image" in done.stderr


def test_a_command_whose_side_is_not_installed_says_what_to_install() -> None:
    done = run_refusing("from kleinstyle.cli.main import main; sys.exit(main(['demo']))")
    assert done.returncode == 2
    assert "kleinstyle demo needs the dev cluster: pip install -e ./devcluster" in done.stderr
