"""Render with FLUX.2 [klein] and LoRAs on diffusers: the sampler behind `kleinstyle generate` and GenerationJobs.

Order of work, chosen for memory (klein 9B at 2048x2048 in bf16; the README has the plan in figures):
1. every prompt and the negative prompt are encoded by the text encoder alone (Qwen3-8B, ~16 GB), which is freed
   before the transformer loads (`encode.encode_captions`, the trainer's own encoding);
2. the transformer (~18 GB) and the VAE load; the LoRAs load as named adapters with their weights and are fused into
   the transformer's weights, so sampling runs no per-layer LoRA matmuls; optionally fp8 block linears
   (`fp8.to_fp8`) and, on CUDA, each block compiled with torch.compile;
3. each image: noise from a CPU generator seeded with the image's seed (the same noise on any device), klein's
   flow-matching schedule, and real CFG with the conditional and unconditional passes batched into one transformer
   call per step; the VAE then decodes the image (tiling on request: larger sizes, smaller GPUs).
The sampling loop is `Flux2KleinPipeline.__call__`'s for text-to-image with the two CFG passes batched; a test
checks that both render the same pixels.
"""

from __future__ import annotations

import gc
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline, compute_empirical_mu, retrieve_timesteps
from PIL import Image

from .encode import check_components, encode_captions
from .fp8 import to_fp8
from .lora_check import LoraFit

log = logging.getLogger(__name__)

# Defaults by model kind (docs/facts.md: Base models use real CFG, 4.0 at 50 steps; distilled ones 4 steps, no CFG).
BASE_DEFAULTS = {"steps": 50, "guidance": 4.0}
DISTILLED_DEFAULTS = {"steps": 4, "guidance": 1.0}
# Rendered sizes: multiples of the VAE's compression x the 2x2 latent patches (16 for klein), within these bounds.
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_SEQUENCE_LENGTH = 512  # tokens the pipeline reads of a prompt, chat template included; it cuts the rest


class SizeError(ValueError):
    """A width or height the model cannot render."""


class PromptTooLong(ValueError):
    """A prompt longer than the text encoder reads."""


@dataclass(frozen=True)
class RenderOptions:
    """How to run, not what to render (a RunSpec's hash does not depend on these)."""

    device: str | None = None  # None: CUDA when there is one
    fp8: bool = False
    compile: bool = True  # each transformer block with torch.compile, on CUDA only
    vae_tiling: bool = False
    fuse_loras: bool = True
    # One transformer call per step for both CFG passes (batch 2); False: two calls, as diffusers' pipeline does.
    batch_cfg: bool = True


# --- facts read from the model directory (no weights) ------------------------------------------------------------


def model_index(model_dir: str | Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((Path(model_dir) / "model_index.json").read_text())
    return index


def model_defaults(model_dir: str | Path) -> dict[str, float]:
    """Steps and guidance for the model's kind: Base (real CFG) or distilled (`is_distilled` in model_index)."""
    return dict(DISTILLED_DEFAULTS if model_index(model_dir).get("is_distilled") else BASE_DEFAULTS)


def size_multiple(model_dir: str | Path) -> int:
    """Pixel multiple the model renders exactly: VAE downsampling x the 2x2 patchify x the transformer's patch."""
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    transformer = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    vae_scale: int = 2 ** (len(vae["block_out_channels"]) - 1)
    return vae_scale * 2 * int(transformer.get("patch_size", 1))


def check_size(width: int, height: int, multiple: int) -> None:
    """Raise SizeError naming the side that does not fit (the pipeline would silently round it down)."""
    for name, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise SizeError(f"{name} {value} is outside {MIN_SIDE}-{MAX_SIDE} pixels")
        if value % multiple:
            low, high = value // multiple * multiple, (value // multiple + 1) * multiple
            raise SizeError(f"{name} {value} is not a multiple of {multiple} (this model renders {low} or {high})")


def prompt_lengths(model_dir: str | Path, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt as the pipeline feeds it to the text encoder (inside Qwen's chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir) / "tokenizer")
    lengths = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        lengths.append(len(tokenizer(text)["input_ids"]))
    return lengths


def check_prompt_lengths(model_dir: str | Path, prompts: Sequence[str], limit: int = MAX_SEQUENCE_LENGTH) -> None:
    for index, length in enumerate(prompt_lengths(model_dir, prompts), start=1):
        if length > limit:
            raise PromptTooLong(
                f"prompt {index} is {length} tokens with the chat template; klein reads at most {limit}: shorten it"
            )


# --- the sampler -------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def encode_prompts(
    model_dir: str | Path, prompts: Sequence[str], negative: str, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(embedding per prompt, the negative prompt's), with the text encoder loaded for this pass only."""
    embeds, empty, _ = encode_captions(
        Path(model_dir),
        [*prompts, negative] if negative else list(prompts),
        layers=None,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=device,
        dtype=compute_dtype(device),
    )
    return (embeds[:-1], embeds[-1]) if negative else (embeds, empty)


class Sampler:
    """The transformer (LoRAs fused in), VAE and scheduler of a klein pipeline, rendering one image per call."""

    def __init__(self, pipe: Flux2KleinPipeline, device: torch.device, batch_cfg: bool = True) -> None:
        self.pipe = pipe
        self.device = device
        self.distilled = bool(pipe.config["is_distilled"])
        self.batch_cfg = batch_cfg

    @torch.no_grad()
    def render(
        self,
        embeds: torch.Tensor,
        negative: torch.Tensor,
        *,
        seed: int,
        width: int,
        height: int,
        steps: int,
        guidance: float,
    ) -> Image.Image:
        """One image for a prompt embedding (1, L, D); CFG against `negative` when guidance > 1 on a Base model."""
        pipe, device = self.pipe, self.device
        transformer = pipe.transformer
        dtype = compute_dtype(device)
        embeds = embeds.to(device, dtype)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents, latent_ids = pipe.prepare_latents(
            batch_size=1,
            num_latents_channels=transformer.config.in_channels // 4,
            height=height,
            width=width,
            dtype=dtype,
            device=device,
            generator=generator,
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
        # diffusers annotates sigmas as a list; its own pipeline passes this same array.
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)  # type: ignore[arg-type]
        pipe.scheduler.set_begin_index(0)
        cfg = guidance > 1 and not self.distilled
        texts = [embeds, negative.to(device, dtype)] if cfg else [embeds]
        if self.batch_cfg:
            texts = [torch.cat(texts)]
        passes = [(text, pipe._prepare_text_ids(text).to(device)) for text in texts]
        for t in timesteps:
            predictions = [self._velocity(latents, latent_ids, text, text_ids, t) for text, text_ids in passes]
            prediction = torch.cat(predictions) if len(predictions) > 1 else predictions[0]
            if cfg:
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance * (conditional - unconditional)
            latents = pipe.scheduler.step(prediction, t, latents, return_dict=False)[0]
        return self._decode(latents, latent_ids, width, height)

    def _velocity(
        self,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        text: torch.Tensor,
        text_ids: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer's prediction for `latents` under each prompt embedding of `text` (a batch of them)."""
        passes = text.shape[0]
        timestep = t.expand(passes).to(latents.dtype)  # as the pipeline: cast first, then / 1000
        velocity: torch.Tensor = self.pipe.transformer(
            hidden_states=latents.repeat(passes, 1, 1),
            timestep=timestep / 1000,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=latent_ids.repeat(passes, 1, 1),
            return_dict=False,
        )[0]
        return velocity

    def _decode(self, latents: torch.Tensor, latent_ids: torch.Tensor, width: int, height: int) -> Image.Image:
        pipe = self.pipe
        side = pipe.vae_scale_factor * 2
        # diffusers annotates this as a list of tensors; it returns them stacked, one tensor.
        latents = pipe._unpack_latents_with_ids(latents, latent_ids, height // side, width // side)  # type: ignore[assignment]
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = pipe._unpatchify_latents(latents * std + mean)
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        decoded: Image.Image = pipe.image_processor.postprocess(image, output_type="pil")[0]
        return decoded


def load_sampler(
    model_dir: str | Path, loras: Sequence[tuple[LoraFit, float]], options: RenderOptions = RenderOptions()
) -> Sampler:
    """The transformer and VAE of `model_dir` with `loras` (checked fits, with weights) applied; see the module doc."""
    model_dir = check_components(model_dir, ("transformer", "vae", "scheduler"))
    device = torch.device(options.device) if options.device else default_device()
    pipe = Flux2KleinPipeline.from_pretrained(model_dir, text_encoder=None, tokenizer=None, dtype=compute_dtype(device))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)  # LoRAs load and fuse where the weights will stay
    if loras:
        names = [f"lora{i}" for i in range(len(loras))]
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for name, (fit, _) in zip(names, loras, strict=True):
                pipe.load_lora_weights(dict(fit.state_dict), adapter_name=name)
        pipe.set_adapters(names, [weight for _, weight in loras])
        if options.fuse_loras or options.fp8:
            pipe.fuse_lora(adapter_names=names)
            pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return prepared(pipe, device, options)


def prepared(pipe: Flux2KleinPipeline, device: torch.device, options: RenderOptions) -> Sampler:
    """A pipeline without text encoder (LoRAs already fused) made ready to sample: fp8, device, VAE tiling, compile.
    The benchmark builds its random 9B pipeline and calls this, so it measures exactly what jobs run."""
    if options.fp8:
        log.info("fp8: %d block linears converted", to_fp8(pipe.transformer))
    pipe.to(device)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile and device.type == "cuda":
        for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
            block.compile()  # regional: the blocks share two compiled graphs
    return Sampler(pipe, device, batch_cfg=options.batch_cfg)


def free(sampler: Sampler) -> None:
    """Release the sampler's GPU memory (the CLI and tests render several jobs in one process)."""
    del sampler.pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
