"""Checkpoint evaluation: render fixed probes with a checkpoint's LoRA and score them
(docs/facts.md#evaluation-and-early-stopping).

Probes are fixed content prompts (with the trigger word) x fixed seeds at a small size, rendered by the same
`Flux2KleinPipeline` generation uses, with real CFG. Each render gets three scores (`early_stop.ProbeScores`):
style (like the references' style), adherence (like the base model's render of the same probe in content) and
leakage (like its nearest training image in content). The base model's renders (step 0) are the baseline.

The embedder is pluggable. `PixelStatsEmbedder` is the deterministic offline one (no model ships offline for
this: docs/facts.md): style = colour moments and the energy of fixed random texture filters, positions pooled away;
content = the layout of light and dark at 16x16, mean-removed, so cosines range over [-1, 1]. A real style encoder
(DINOv2, SigLIP...) in a local directory plugs in through `VisionModelEmbedder` with the same interface.

Cost: the evaluator holds its own transformer and VAE (the text encoder is dropped once the probe prompts are
encoded): on klein 9B about 18 GB more beside the trainer's 39 GB (compile) on an 80 GB or 141 GB card, and
prompts x seeds renders of `steps` steps per checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline
from kleinstyle.contract.early_stop import ProbeScores
from kleinstyle.contract.reports import ProbeScoresReport
from kleinstyle.contract.runspec import EvaluationSpec
from PIL import Image

from ..artifacts import write_file_atomic
from .encode import check_model_dir, encode_captions, free_memory, load_rgb

log = logging.getLogger(__name__)

# Content-only subjects that span people, places and objects; the trigger word is prefixed at run time.
PROBE_PROMPTS = (
    "a portrait of a woman looking at the viewer",
    "a small house beside a river",
    "a bowl of fruit on a wooden table",
    "a man riding a bicycle down a street",
)
EVAL_VERSION = "probes-v1"
_ADAPTER = "kleinstyle_probe"


class Embedder(Protocol):
    def style(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def content(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def _pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class PixelStatsEmbedder:
    """The offline embedder: fixed statistics of pixels, the same on every machine (seeded filters)."""

    def __init__(self, *, seed: int = 0, size: int = 128, filters: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(filters, 3, 5, 5, generator=generator)
        self.filters = weight - weight.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean: texture, not brightness
        self.size = size

    def style(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = _pixels(images, self.size)
        colour = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        hsv_like = torch.stack([x.max(1).values - x.min(1).values, x.max(1).values], dim=1)  # chroma and value
        tone = torch.cat([hsv_like.mean(dim=(2, 3)), hsv_like.std(dim=(2, 3))], dim=1)
        texture = F.conv2d(x, self.filters, padding=2).abs().mean(dim=(2, 3))
        share = texture / texture.sum(1, keepdim=True).clamp(min=1e-8)  # a flat image has no texture: all zeros
        return F.normalize(torch.cat([colour, tone, share], dim=1) - 0.25, dim=1)

    def content(self, images: Sequence[Image.Image]) -> torch.Tensor:
        grey = _pixels(images, self.size).mean(dim=1, keepdim=True)
        layout = F.adaptive_avg_pool2d(grey, 16).flatten(1)
        return F.normalize(layout - layout.mean(dim=1, keepdim=True), dim=1)


class VisionModelEmbedder:
    """A real image encoder from a local transformers directory (DINOv2, SigLIP vision, ViT...): style is the
    pooled embedding, content the patch tokens' grid, each mean-removed and normalised."""

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.device = device or torch.device("cpu")
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(self.device).eval()

    @torch.no_grad()
    def _hidden(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        model = getattr(self.model, "vision_model", self.model)
        return model(pixel_values=inputs["pixel_values"]).last_hidden_state.float().cpu()

    def style(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pooled = self._hidden(images).mean(dim=1)
        return F.normalize(pooled - pooled.mean(dim=1, keepdim=True), dim=1)

    def content(self, images: Sequence[Image.Image]) -> torch.Tensor:
        config = getattr(self.model.config, "vision_config", self.model.config)
        patches = (config.image_size // config.patch_size) ** 2  # the last tokens; CLS and registers come first
        tokens = self._hidden(images)[:, -patches:].flatten(1)
        return F.normalize(tokens - tokens.mean(dim=1, keepdim=True), dim=1)


class Evaluator:
    """Renders the probes of one training run and scores them; one instance per run, kept across checkpoints."""

    def __init__(
        self,
        model_dir: str | Path,
        references: Sequence[Path],
        trigger_word: str,
        settings: EvaluationSpec,
        *,
        cache_dir: str | Path,
        text_encoder_layers: Sequence[int] | None = None,
        embedder: Embedder | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if settings.prompts > len(PROBE_PROMPTS):
            raise ValueError(f"at most {len(PROBE_PROMPTS)} probe prompts, not {settings.prompts}")
        if not references:
            raise ValueError("checkpoint evaluation needs at least one reference image")
        self.settings = settings
        self.device = device or torch.device("cpu")
        self.embedder = embedder or PixelStatsEmbedder()
        self.cache_dir = Path(cache_dir)
        self.prompts = [f"{trigger_word}. {p}" for p in PROBE_PROMPTS[: settings.prompts]]
        model_dir = check_model_dir(model_dir)
        embeds, self.negative, _ = encode_captions(
            model_dir,
            self.prompts,
            layers=text_encoder_layers,
            max_sequence_length=512,  # as generation encodes prompts (klein/generate.py MAX_SEQUENCE_LENGTH)
            device=self.device,
            dtype=dtype,
        )
        self.embeds = embeds
        self.pipe = Flux2KleinPipeline.from_pretrained(model_dir, text_encoder=None, tokenizer=None, dtype=dtype).to(
            self.device
        )
        self.pipe.set_progress_bar_config(disable=True)
        refs = [load_rgb(p) for p in references]
        self.reference_style = F.normalize(self.embedder.style(refs).mean(dim=0), dim=0)
        self.reference_content = self.embedder.content(refs)
        self.key = hashlib.sha256(
            json.dumps(
                [EVAL_VERSION, self.prompts, settings.model_dump(mode="json"), [str(p) for p in references]]
            ).encode()
        ).hexdigest()[:12]
        self._base_content: torch.Tensor | None = None

    def render(self) -> list[Image.Image]:
        """Every probe, prompt-major, with the pipeline as it stands (adapters loaded or not)."""
        s = self.settings
        images = []
        for embeds in self.embeds:
            for seed in range(s.seeds):
                out = self.pipe(
                    prompt_embeds=embeds,
                    negative_prompt_embeds=self.negative,
                    height=s.size,
                    width=s.size,
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
                images.append(out.images[0])
        return images

    def _scores(self, step: int, images: Sequence[Image.Image]) -> ProbeScores:
        style = self.embedder.style(images) @ self.reference_style
        content = self.embedder.content(images)
        if self._base_content is None:
            self._base_content = content
        adherence = (content * self._base_content).sum(dim=1)
        leakage = (content @ self.reference_content.T).max(dim=1).values
        return ProbeScores(step, _floats(style), _floats(adherence), _floats(leakage))

    def _cached(self, step: int, lora_file: Path | None) -> tuple[Path, str]:
        digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()[:12] if lora_file else "base"
        return self.cache_dir / f"step_{step:06d}.json", f"{self.key}:{digest}"

    @torch.no_grad()
    def score(self, step: int, lora_file: Path | None) -> ProbeScores:
        """Scores of the LoRA in `lora_file` (None: the base model, step 0). Cached beside the checkpoints by
        probe settings and file content, so a restarted pod does not render a checkpoint twice."""
        if lora_file is not None and self._base_content is None:
            self.score(0, None)  # adherence needs the base renders first
        path, key = self._cached(step, lora_file)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("key") == key:
                if step == 0:
                    self._base_content = torch.tensor(data["base_content"])
                return ProbeScores.from_report(ProbeScoresReport.model_validate(data))
        if lora_file is None:
            scores = self._scores(step, self.render())
        else:
            self.pipe.load_lora_weights(str(lora_file), adapter_name=_ADAPTER)
            try:
                scores = self._scores(step, self.render())
            finally:
                self.pipe.delete_adapters(_ADAPTER)
        record = {"key": key, **scores.to_report().model_dump(mode="json")}
        if step == 0:
            record["base_content"] = self._base_content.tolist()
        write_file_atomic(path, json.dumps(record).encode())
        return scores

    def close(self) -> None:
        del self.pipe
        free_memory()


def _floats(values: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)
