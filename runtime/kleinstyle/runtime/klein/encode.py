"""Encode a dataset once, before training: captions through Qwen3, images through the VAE.

The training loop then sees only cached tensors, so neither the text encoder (Qwen3-8B for klein 9B) nor the VAE
sits in memory beside the transformer. Both passes go through the pipeline's own code (`encode_prompt`,
`image_processor.preprocess`, `_encode_vae_image`), so training sees exactly the embeddings and the normalised
latents (patchified 2x2, `vae.bn` running statistics) that generation produces.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from PIL import Image, ImageOps

from .arch import text_encoder_layers
from .dataset import Sample, training_size


class ModelDirError(FileNotFoundError):
    """The model directory is missing or is not a diffusers Klein pipeline."""


@dataclass
class EncodedDataset:
    """Everything the loop needs, per sample index: latents (1, 4C, h, w) and the caption's embedding (1, L, D).

    `buckets` maps (width, height) in pixels to the sample indices that share it; a batch never mixes buckets.
    `empty` is the embedding of the empty prompt, used when caption dropout fires (the whole caption, trigger
    word included, is dropped) and by the pipeline as the CFG negative.
    """

    latents: list[torch.Tensor]
    captions: list[torch.Tensor]
    empty: torch.Tensor
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    text_layers: tuple[int, ...] = ()

    def caption_for(self, index: int, dropped: bool) -> torch.Tensor:
        """The embedding sample `index` trains with: its caption's, or the empty prompt's when dropped."""
        return self.empty if dropped else self.captions[index]


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise ModelDirError(f"no diffusers pipeline at {path} (model_index.json missing)")
    return path


# The files each component needs: (config, weights); weights may be sharded (an index naming its shards).
_COMPONENT_FILES = {
    "transformer": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer_config.json", None),
    "scheduler": ("scheduler_config.json", None),
}


def check_components(model_dir: str | Path, components: tuple[str, ...] = tuple(_COMPONENT_FILES)) -> Path:
    """`check_model_dir`, and every file of `components` present (sharded weights: each shard the index names),
    so an incomplete copy fails at once with the first missing file, not minutes later inside from_pretrained."""
    path = check_model_dir(model_dir)
    for component in components:
        config, weights = _COMPONENT_FILES[component]
        if not (path / component / config).is_file():
            raise ModelDirError(f"incomplete model directory {path}: {component}/{config} is missing")
        if weights is None or (path / component / weights).is_file():
            continue
        index = path / component / f"{weights}.index.json"
        if not index.is_file():
            raise ModelDirError(f"incomplete model directory {path}: {component}/{weights} (or its index) is missing")
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelDirError(f"unreadable weight index {index}: {exc}") from exc
        for shard in shards:
            if not (path / component / shard).is_file():
                raise ModelDirError(f"incomplete model directory {path}: {component}/{shard} is missing")
    return path


def encode_dataset(
    model_dir: str | Path,
    samples: Sequence[Sample],
    *,
    resolution: int,
    bucket_multiple: int,
    max_sequence_length: int,
    layers: Sequence[int] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> EncodedDataset:
    """Encode captions, then images, loading each encoder only for its own pass and freeing it afterwards."""
    model_dir = check_model_dir(model_dir)
    captions, empty, used_layers = encode_captions(
        model_dir,
        [s.caption for s in samples],
        layers=layers,
        max_sequence_length=max_sequence_length,
        device=device,
        dtype=dtype,
    )
    latents, buckets = encode_images(
        model_dir, samples, resolution=resolution, multiple=bucket_multiple, device=device, dtype=dtype
    )
    return EncodedDataset(latents=latents, captions=captions, empty=empty, buckets=buckets, text_layers=used_layers)


@torch.no_grad()
def encode_captions(
    model_dir: Path,
    captions: Sequence[str],
    *,
    layers: Sequence[int] | None,
    max_sequence_length: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, ...]]:
    """Per-caption embeddings (identical captions share one tensor), the empty prompt's, and the layers used."""
    pipe = Flux2KleinPipeline.from_pretrained(model_dir, transformer=None, vae=None, dtype=dtype).to(device)
    try:
        used = tuple(layers) if layers else text_encoder_layers(pipe.text_encoder.config.num_hidden_layers)
        cache: dict[str, torch.Tensor] = {}
        for caption in ["", *captions]:
            if caption not in cache:
                embeds, _ = pipe.encode_prompt(
                    prompt=caption,
                    device=device,
                    max_sequence_length=max_sequence_length,
                    # diffusers annotates the layers as tuple[int] (one) where it means tuple[int, ...].
                    text_encoder_out_layers=used,  # type: ignore[arg-type]
                )
                cache[caption] = embeds.to(dtype)
        return [cache[c] for c in captions], cache[""], used
    finally:
        del pipe
        free_memory()


@torch.no_grad()
def encode_images(
    model_dir: Path,
    samples: Sequence[Sample],
    *,
    resolution: int,
    multiple: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], dict[tuple[int, int], list[int]]]:
    """Normalised packed-ready latents per sample, each at its bucket's size, and the bucket membership."""
    pipe = Flux2KleinPipeline.from_pretrained(
        model_dir, transformer=None, text_encoder=None, tokenizer=None, dtype=dtype
    ).to(device)
    try:
        pixel_multiple = pipe.vae_scale_factor * 2  # VAE downsampling x 2x2 patchify
        if multiple % pixel_multiple:
            raise ValueError(f"bucket step {multiple} must be a multiple of {pixel_multiple} for this VAE")
        latents: list[torch.Tensor] = []
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(samples):
            image = load_rgb(sample.image)
            if sample.mirrored:  # the flip augmentation's copy: mirrored before resizing and cropping, as ai-toolkit
                image = ImageOps.mirror(image)
            width, height = training_size(image.size, resolution, multiple)
            pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
            # diffusers annotates generator as a torch.Generator; None (its default downstream) takes the mode.
            latent = pipe._encode_vae_image(pixels.to(device=device, dtype=dtype), generator=None)  # type: ignore[arg-type]
            latents.append(latent.to(dtype))
            buckets.setdefault((width, height), []).append(index)
        return latents, buckets
    finally:
        del pipe
        free_memory()


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
