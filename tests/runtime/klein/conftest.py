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


@pytest.fixture(scope="session")
def random_lora(tiny_klein: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """random_lora(seed, rank=4, scale=0.3) -> a LoRA file in the published format (`transformer.<module>.lora_A`
    / `lora_B` on every targetable linear of the tiny klein), big enough to visibly change a render."""
    import torch
    from kleinstyle.runtime.klein.arch import lora_linear_names
    from kleinstyle.runtime.klein.lora_check import transformer_skeleton
    from safetensors.torch import save_file

    skeleton = transformer_skeleton(tiny_klein)
    folder = tmp_path_factory.mktemp("loras")

    def make(seed: int, rank: int = 4, scale: float = 0.3) -> Path:
        path = folder / f"lora-{seed}-r{rank}-{scale}.safetensors"
        if not path.exists():
            generator = torch.Generator().manual_seed(seed)
            state = {}
            for name in lora_linear_names(skeleton):
                layer = skeleton.get_submodule(name)
                state[f"transformer.{name}.lora_A.weight"] = scale * torch.randn(
                    rank, layer.in_features, generator=generator
                )
                state[f"transformer.{name}.lora_B.weight"] = scale * torch.randn(
                    layer.out_features, rank, generator=generator
                )
            save_file(state, path)
        return path

    return make
