"""Fixtures for the Klein runtime: one tiny random pipeline per session and small ai-toolkit style datasets.

Everything is built in-process under pytest's temp folders; nothing reaches the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("diffusers", reason="the Klein runtime needs the runtime extra (torch, diffusers, peft)")

from kleinstyle.runtime.klein.tiny import write_tiny_klein

CAPTIONS = ("tokstyle. a red house by a lake", "tokstyle. a cat sleeping on a sofa", "tokstyle. a tall pine tree")


def make_picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random picture: an upscaled random 6x6 colour grid."""
    rng = random.Random(seed)
    grid = Image.frombytes("RGB", (6, 6), bytes(rng.randrange(256) for _ in range(6 * 6 * 3)))
    return grid.resize(size, Image.Resampling.BICUBIC)


def write_dataset(
    directory: Path, captions: Sequence[str | None], sizes: Sequence[tuple[int, int]] | None = None
) -> Path:
    """NNN.png + NNN.txt pairs; a None caption writes no .txt file. Picture i is the same in every dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, caption in enumerate(captions):
        size = sizes[index] if sizes else (64, 64)
        make_picture(index, size).save(directory / f"{index:03d}.png")
        if caption is not None:
            (directory / f"{index:03d}.txt").write_text(caption)
    return directory


@pytest.fixture(scope="session")
def captions() -> tuple[str, ...]:
    """The captions `two_images` carries, in order (then a third one)."""
    return CAPTIONS


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.2 [klein] pipeline directory (seed 0), written once per session."""
    return write_tiny_klein(tmp_path_factory.mktemp("models") / "tiny-klein")


@pytest.fixture(scope="session")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 captioned images."""
    return write_dataset(tmp_path_factory.mktemp("data") / "two", CAPTIONS[:2])


@pytest.fixture
def dataset(tmp_path: Path) -> Callable[..., Path]:
    """dataset(captions, sizes=None, name="data") -> a fresh dataset folder under this test's tmp_path."""

    def make(captions: Sequence[str | None], sizes: Sequence[tuple[int, int]] | None = None, name: str = "data"):
        return write_dataset(tmp_path / name, captions, sizes)

    return make
