"""Fixtures for the Klein runtime: one tiny random pipeline per session and small ai-toolkit style datasets.

Everything is built in-process under pytest's temp folders; nothing reaches the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers", reason="the Klein runtime needs the runtime extra (torch, diffusers, peft)")

import torch
from diffusers import Flux2KleinPipeline
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS, write_tiny_klein
from kleinstyle.runtime.klein.tiny_evaluators import write_tiny_evaluators

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
def tiny_evaluators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random CSD, CLIP and DINOv2 folders (tiny_evaluators.STYLE_DIR, TEXT_DIR, CONTENT_DIR), once per session."""
    folder = tmp_path_factory.mktemp("evaluators")
    write_tiny_evaluators(folder)
    return folder


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


PROMPT = "tokstyle. a red house by a lake"


class TinyRender:
    """The one reference render of the tiny klein tests compare: 64x64, 2 steps, seed 0."""

    def __call__(self, model: Path, lora: Path | None = None, prompt: str = PROMPT) -> np.ndarray:
        """A fresh pipeline from `model` with the LoRA file loaded (none: the base model)."""
        pipe = Flux2KleinPipeline.from_pretrained(model)
        if lora is not None:
            pipe.load_lora_weights(lora)
        return self.sample(pipe, prompt)

    @staticmethod
    def sample(pipe: Flux2KleinPipeline, prompt: str = PROMPT) -> np.ndarray:
        """The render of a pipeline already built (its LoRAs loaded or merged)."""
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            text_encoder_out_layers=TINY_TEXT_ENCODER_LAYERS,
            output_type="np",
        ).images


@pytest.fixture(scope="session")
def render_tiny() -> TinyRender:
    return TinyRender()
