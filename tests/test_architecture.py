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


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def lint_copy(tmp_path: Path, plant: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contracts on a copy of the sources, laid out as they are (each top folder a
    part of the `kleinstyle` namespace), with `plant` = (module path under kleinstyle/, line) added."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / plant[0].split("/")[0] / "kleinstyle" / plant[0]
    path.write_text(path.read_text() + f"\n{plant[1]}\n")
    # The copy's folders on the path, ahead of the installed project: PEP 420 joins them into one namespace.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tmp_path / package) for package in PACKAGES)}
    return lint_imports(tmp_path, env)


def test_the_import_rules_hold_on_the_tree_in_place() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_folder_paths_are_import_paths_and_nothing_shadows_the_standard_library() -> None:
    """From the repository root (where `python` puts the current folder first on the path): `operator` is the
    standard library's, and every module's file lies at its import path under its top folder."""
    code = (
        "import operator, importlib, pathlib, sys; assert operator.add(1, 2) == 3\n"
        "for name in sys.argv[1:]:\n"
        "    path = pathlib.Path(importlib.import_module(name).__file__).resolve()\n"
        "    top = name.split('.')[1]\n"
        "    expected = pathlib.Path(top, *name.split('.')).with_suffix('.py')\n"
        "    package = expected.with_suffix('') / '__init__.py'\n"
        "    assert path.relative_to(pathlib.Path.cwd().resolve()) in (expected, package), path\n"
    )
    modules = [
        "kleinstyle.operator.reconcile",
        "kleinstyle.contract.layout",
        "kleinstyle.cli.main",
        "kleinstyle.devcluster.demo",
        "kleinstyle.operator",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("plant", "broken", "shown"),
    [
        (
            ("operator/reconcile.py", "import kleinstyle.runtime.prepare"),
            "operator and runtime never import each other",
            "kleinstyle.operator.reconcile -> kleinstyle.runtime.prepare",
        ),
        (
            ("runtime/train/__init__.py", "from kleinstyle.operator.kinds import KIND_RUNS"),
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
