"""Checkpoint evaluation: render fixed probes with a checkpoint's LoRA and score them
(docs/facts.md#evaluation-and-early-stopping, docs/policy.md#early-stopping).

Probes are fixed content prompts (with the trigger word) x fixed seeds at a small size, rendered by the same
`Flux2KleinPipeline` generation uses, with real CFG. Each render gets three scores (`early_stop.ProbeScores`), the
base model's renders (step 0) being the baseline:
- style: cosine, in a style embedding, to the references' mean style. `CSDStyleEmbedder` (Contrastive Style
  Descriptors, arXiv 2404.01292: a CLIP ViT-L vision tower and a style projection) from a model directory when one
  is configured; otherwise `PixelStatsEmbedder`'s colour moments and texture-filter energies, positions pooled
  away. Not DINOv2 or SigLIP pooled features: those encode what an image shows, which is what leakage penalises.
- adherence: the render's agreement with its prompt's text, `TextImageScorer` (a CLIP or SigLIP model directory,
  text and vision towers). Never the render's likeness to the base model's render: the LoRA is meant to change the
  picture. Without a model it is not measured (`UnmeasuredAdherence`, 1.0 everywhere, so it never penalises).
- leakage: the render's content likeness to its nearest training image: `VisionModelEmbedder` (DINOv2, SigLIP
  vision...) patch tokens from a model directory, or the offline light/dark layout.
Each checkpoint also gets a held-out validation loss when the plan leaves references out of training: the
flow-matching loss on them at fixed noise levels (0.25, 0.5, 0.75, 0.9) with fixed noise, at their training size.

The probe renders are kept (as thumbnails) beside the scores, so `gallery` can lay out every step's probes in one
labelled contact sheet: a person sees why a checkpoint won.

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

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from kleinstyle.contract.early_stop import ProbeScores, Verdict
from kleinstyle.contract.proxies import on_proxies
from kleinstyle.contract.reports import ProbeScoresReport
from kleinstyle.contract.runspec import EvaluationSpec
from PIL import Image

from ..artifacts import write_file_atomic
from ..contact_sheet import Cell, contact_sheet
from .dataset import Sample
from .encode import check_model_dir, encode_captions, encode_images, free_memory, load_rgb

log = logging.getLogger(__name__)

# Content-only subjects that span people, places and objects; the trigger word is prefixed at run time.
PROBE_PROMPTS = (
    "a portrait of a woman looking at the viewer",
    "a small house beside a river",
    "a bowl of fruit on a wooden table",
    "a man riding a bicycle down a street",
)
EVAL_VERSION = "probes-v2"
VALIDATION_SIGMAS = (0.25, 0.5, 0.75, 0.9)
CSD_PROJECTION = "csd_style_projection.safetensors"  # CSD's style head beside its CLIP vision tower
THUMB = 128
_ADAPTER = "kleinstyle_probe"
# What measures a score when its model is missing: a proxy, said so wherever the score is shown.
STAND_INS = {
    "style": "colour moments and texture-filter energies, not a style model",
    "adherence": "not measured (1.0 for every render)",
    "leakage": "the 16x16 light/dark layout, not a content model",
}


class StyleEmbedder(Protocol):
    def style(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class ContentEmbedder(Protocol):
    def content(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class AdherenceScorer(Protocol):
    def adherence(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor: ...


def _pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class PixelStatsEmbedder:
    """The offline embedder: fixed statistics of pixels, the same on every machine (seeded filters). Style is
    colour, tone and texture with positions pooled away; content the 16x16 layout of light and dark."""

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


class _ImageModel:
    """A transformers image model and its processor from a local directory (never a hub)."""

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.device = device or torch.device("cpu")
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(self.device).eval()
        self.vision = getattr(self.model, "vision_model", self.model)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels: torch.Tensor = inputs["pixel_values"].to(self.device)
        return pixels


class VisionModelEmbedder(_ImageModel):
    """Content for leakage from a real image encoder (DINOv2, SigLIP vision, ViT...): the patch tokens' grid,
    mean-removed and normalised. The patch count comes from the processor's actual crop, not the config's size."""

    @torch.no_grad()
    def content(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.pixel_values(images)
        config = getattr(self.model.config, "vision_config", self.model.config)
        patches = (pixels.shape[-2] // config.patch_size) * (pixels.shape[-1] // config.patch_size)
        hidden = self.vision(pixel_values=pixels).last_hidden_state.float().cpu()
        tokens = hidden[:, -patches:].flatten(1)  # the last tokens; CLS and registers come first
        return F.normalize(tokens - tokens.mean(dim=1, keepdim=True), dim=1)


class CSDStyleEmbedder(_ImageModel):
    """CSD style descriptors: the pooled output of a CLIP vision tower times CSD's style projection, normalised.

    The directory holds the vision tower in transformers' layout (`CLIPVisionModel`: config.json, weights,
    preprocessor_config.json) and `csd_style_projection.safetensors` with one tensor `weight` of shape
    (style dim, hidden size): CSD's `last_layer_style`, transposed."""

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None) -> None:
        from safetensors.torch import load_file

        super().__init__(model_dir, device=device)
        projection = Path(model_dir) / CSD_PROJECTION
        if not projection.is_file():
            raise FileNotFoundError(f"{model_dir}: no {CSD_PROJECTION} (CSD's style projection) beside the encoder")
        self.projection = load_file(str(projection))["weight"].float().to(self.device)

    @torch.no_grad()
    def style(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pooled = self.vision(pixel_values=self.pixel_values(images)).pooler_output.float()
        return F.normalize(pooled @ self.projection.T, dim=1).cpu()


class TextImageScorer(_ImageModel):
    """Image-text agreement from a CLIP or SigLIP directory: the cosine of the image and text embeddings."""

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None) -> None:
        from transformers import AutoTokenizer

        super().__init__(model_dir, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    @torch.no_grad()
    def adherence(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        image = F.normalize(_features(self.model.get_image_features(pixel_values=self.pixel_values(images))), dim=1)
        config = getattr(self.model.config, "text_config", self.model.config)
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",  # SigLIP was trained on max-length padding; CLIP pools at its end token anyway
            truncation=True,
            max_length=config.max_position_embeddings,
            return_tensors="pt",
        )
        text = F.normalize(_features(self.model.get_text_features(**tokens.to(self.device))), dim=1)
        return (image * text).sum(dim=1).float().cpu()


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """The embedding tensor, whether a model returns it bare or in an output object (newer transformers)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise AttributeError(f"{type(output).__name__} has no pooler_output tensor")
    return pooled.float()


class UnmeasuredAdherence:
    """Adherence without a text-image model: 1.0 for every render, so it never penalises a checkpoint."""

    def adherence(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return torch.ones(len(images))


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
        style: StyleEmbedder | None = None,
        content: ContentEmbedder | None = None,
        adherence: AdherenceScorer | None = None,
        held_out: Sequence[Sample] = (),
        resolution: int = 1024,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if settings.prompts > len(PROBE_PROMPTS):
            raise ValueError(f"at most {len(PROBE_PROMPTS)} probe prompts, not {settings.prompts}")
        if not references:
            raise ValueError("checkpoint evaluation needs at least one reference image")
        self.settings = settings
        self.device = device or torch.device("cpu")
        offline = PixelStatsEmbedder()
        given = {"style": style, "adherence": adherence, "leakage": content}
        self.stand_ins = {score: STAND_INS[score] for score, model in given.items() if model is None}
        self.style_embedder = style or offline
        self.content_embedder = content or offline
        self.adherence_scorer = adherence or UnmeasuredAdherence()
        self.cache_dir = Path(cache_dir)
        self.prompts = [f"{trigger_word}. {p}" for p in PROBE_PROMPTS[: settings.prompts]]
        self.probe_prompts = [prompt for prompt in self.prompts for _ in range(settings.seeds)]  # render order
        model_dir = check_model_dir(model_dir)
        embeds, self.negative, _ = encode_captions(
            model_dir,
            [*self.prompts, *(sample.caption for sample in held_out)],
            layers=text_encoder_layers,
            max_sequence_length=512,  # as generation encodes prompts (klein/generate.py MAX_SEQUENCE_LENGTH)
            device=self.device,
            dtype=dtype,
        )
        self.embeds, held_out_embeds = embeds[: len(self.prompts)], embeds[len(self.prompts) :]
        self.validation: list[tuple[torch.Tensor, torch.Tensor]] = []
        if held_out:
            latents, _ = encode_images(
                model_dir, held_out, resolution=resolution, multiple=32, device=self.device, dtype=dtype
            )
            self.validation = list(zip(latents, held_out_embeds, strict=True))
        self.pipe = Flux2KleinPipeline.from_pretrained(model_dir, text_encoder=None, tokenizer=None, dtype=dtype).to(
            self.device
        )
        self.pipe.set_progress_bar_config(disable=True)
        refs = [load_rgb(p) for p in references]
        self.reference_style = F.normalize(self.style_embedder.style(refs).mean(dim=0), dim=0)
        self.reference_content = self.content_embedder.content(refs)
        self.key = hashlib.sha256(
            json.dumps(
                [
                    EVAL_VERSION,
                    self.prompts,
                    settings.model_dump(mode="json"),
                    [str(p) for p in references],
                    [str(s.image) for s in held_out],
                    resolution,
                ]
            ).encode()
        ).hexdigest()[:12]

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

    def validation_loss(self) -> float | None:
        """The flow-matching loss on the held-out references at fixed noise levels and fixed noise (None
        without any): the same number for the same weights on every machine and pod."""
        if not self.validation:
            return None
        from .lora_train import flow_matching_loss

        transformer = self.pipe.transformer
        losses = []
        for index, (latents, embeds) in enumerate(self.validation):
            for level, sigma in enumerate(VALIDATION_SIGMAS):
                generator = torch.Generator("cpu").manual_seed(1000 * index + level)
                noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
                sigmas = torch.tensor([sigma], device=self.device, dtype=latents.dtype)
                losses.append(float(flow_matching_loss(transformer, latents, embeds, noise, sigmas)))
        return round(sum(losses) / len(losses), 6)

    def _scores(self, step: int, images: Sequence[Image.Image]) -> ProbeScores:
        style = self.style_embedder.style(images) @ self.reference_style
        adherence = self.adherence_scorer.adherence(images, self.probe_prompts)
        content = self.content_embedder.content(images)
        leakage = (content @ self.reference_content.T).max(dim=1).values
        return ProbeScores(step, _floats(style), _floats(adherence), _floats(leakage), self.validation_loss())

    def _cached(self, step: int, lora_file: Path | None) -> tuple[Path, str]:
        digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()[:12] if lora_file else "base"
        return self.cache_dir / f"step_{step:06d}.json", f"{self.key}:{digest}"

    @torch.no_grad()
    def score(self, step: int, lora_file: Path | None) -> ProbeScores:
        """Scores of the LoRA in `lora_file` (None: the base model, step 0). Cached beside the checkpoints by
        probe settings and file content, so a restarted pod does not render a checkpoint twice."""
        path, key = self._cached(step, lora_file)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return ProbeScores.from_report(ProbeScoresReport.model_validate(data))
        if lora_file is not None:
            self.pipe.load_lora_weights(str(lora_file), adapter_name=_ADAPTER)
        try:
            images = self.render()
            scores = self._scores(step, images)
        finally:
            if lora_file is not None:
                self.pipe.delete_adapters(_ADAPTER)
        folder = self.cache_dir / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            thumb.save(folder / f"probe_{index:02d}.png")
        record = {"key": key, **scores.to_report().model_dump(mode="json")}
        write_file_atomic(path, json.dumps(record).encode())  # last: the thumbnails are there when it is
        return scores

    def gallery(self, decision: Verdict | None) -> Image.Image | None:
        """Every evaluated step's probe renders in one labelled sheet: a row per step (the base model first), a
        column per probe, each row titled with its score and, for the best, that it became the LoRA."""
        rows = sorted(int(p.name.removeprefix("step_")) for p in self.cache_dir.glob("step_*") if p.is_dir())
        if not rows:
            return None
        cells = []
        header = ["a row per step; J: its score"]
        if self.stand_ins:  # said on the sheet itself: it travels without status
            header.append("PROXY scores, no early stop: " + "; ".join(f"{k}: {v}" for k, v in self.stand_ins.items()))
            decision = None if decision is None else on_proxies(decision, self.stand_ins)
        for step in rows:
            title = _row_title(step, decision)
            for index, prompt in enumerate(self.probe_prompts):
                file = self.cache_dir / f"step_{step:06d}" / f"probe_{index:02d}.png"
                image = Image.open(file).convert("RGB") if file.is_file() else Image.new("RGB", (THUMB, THUMB))
                cells.append(Cell(image, title if index == 0 else f"probe {index + 1}", prompt))
        sheet, _ = contact_sheet(cells, columns=len(self.probe_prompts), header=header, thumb=THUMB)
        return sheet

    def close(self) -> None:
        del self.pipe
        free_memory()


def _row_title(step: int, decision: Verdict | None) -> str:
    """`step 200 J 0.9312 best`: what the policy made of a step, short enough for a thumbnail's width."""
    judged = next((j for j in decision.judged if j.step == step), None) if decision else None
    if step == 0:
        title, score = "base", decision.base_score if decision else None
    else:
        title, score = f"step {step}", judged.score if judged and judged.eligible else None
        if judged and not judged.eligible:
            title += " ineligible"
    if score is not None:
        title += f" J {score:.4f}"
    if decision and decision.best_step == step:
        title += " best" if step else " best: no LoRA"
    return title


def _floats(values: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)
