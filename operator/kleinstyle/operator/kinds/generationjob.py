"""GenerationJob: LoRAs and prompts -> a `generate` run (GPU) -> images and a contact sheet.

YAML -> `build`: the text-pipeline policy (`contract.prompt_policy`, from the LoRAs' training plans), the trigger
words, the STYLE_PROFILE to reformulate with, the size and steps within the operator's generationLimits -> Job
`kleinstyle generate` (kleinstyle.runtime.generate) -> `GenerateProgress` (`live`: images done) -> `GenerateResult`
(`result`: every image's URI from the RunSpec's file names, the prompt each rendered with, timings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kleinstyle.contract.layout import CONTACT_SHEET, image_file
from kleinstyle.contract.pod import PROVIDER_KEY_ENV
from kleinstyle.contract.prompt_policy import decide_prompt_mode
from kleinstyle.contract.reports import GenerateProgress, GenerateResult
from kleinstyle.contract.runspec import GenerateSpec

from ..api import BY_KIND
from ..api.generationjob import (
    GeneratedImage,
    GeneratedPrompt,
    GenerationJobOutcome,
    GenerationJobSpec,
    GenerationJobStatus,
    RenderSettings,
)
from ..children import Run, SecretEnv
from ..config import OperatorConfig
from .base import Dependencies, Dependency, KindRuns, build_run, model_path, with_provider_url
from .loras import lora_dependencies, lora_inputs, lora_style, style_profile, trigger_words


class GenerationJobRuns(
    KindRuns[GenerationJobSpec, GenerateSpec, GenerateProgress, GenerateResult, GenerationJobStatus]
):
    kind = BY_KIND["GenerationJob"]
    step = "generate"
    outcome = GenerationJobOutcome
    status_type = GenerationJobStatus
    work_type = GenerateSpec

    def dependencies(self, spec: GenerationJobSpec) -> list[Dependency]:
        return lora_dependencies(spec.loras)

    def build(self, body: Mapping[str, Any], spec: GenerationJobSpec, deps: Dependencies, cfg: OperatorConfig) -> Run:
        styles = [lora_style(ref, deps) for ref in spec.loras]
        mode, reason = decide_prompt_mode(spec.text_pipeline, styles)
        width, height, steps, warnings = capped_render(spec, cfg)
        prompts, count, capped = capped_images(spec, cfg)
        warnings += capped
        if spec.text_pipeline == "on":
            off = [style.label for style in styles if style.text_pipeline is False]
            warnings += [f"textPipeline is on although the training plan of {label} turns it off" for label in off]
        work = GenerateSpec(
            model_path=model_path(cfg, spec.model.name),
            loras=lora_inputs(spec.loras, deps, cfg),
            prompts=prompts,
            negative_prompt=spec.negative_prompt,
            prompt_mode=mode,
            prompt_mode_reason=reason,
            trigger_words=trigger_words(styles),
            style_profile=style_profile(spec.loras, deps) if mode == "reformulate" else None,
            reformulation_provider=spec.reformulation.provider,
            reformulation_model=spec.reformulation.model,
            width=width,
            height=height,
            steps=steps,
            guidance=spec.guidance,
            seeds=tuple(spec.seed + i for i in range(count)),
            warnings=tuple(warnings),
        )
        secrets = []
        key = spec.reformulation.api_key_secret
        if mode == "reformulate" and key:  # optional: without it the runtime falls back to raw prompts and says so
            secrets.append(SecretEnv(PROVIDER_KEY_ENV[spec.reformulation.provider], key.name, key.key, optional=True))
        run = build_run(self.kind, body, work, cfg, spec.scheduling, secrets)
        return with_provider_url(run, spec.reformulation.provider, cfg) if mode == "reformulate" else run

    def planned(self, run: Run) -> tuple[GenerationJobStatus, list[str]]:
        """The settings as the run renders them, known before its Job starts, and the operator's warnings."""
        work = self.work(run)
        render = RenderSettings(
            width=work.width,
            height=work.height,
            steps=work.steps,
            guidance=work.guidance,
            text_pipeline="on" if work.prompt_mode == "reformulate" else "off",
            text_pipeline_reason=work.prompt_mode_reason,
            trigger_words=list(work.trigger_words),
        )
        return GenerationJobStatus(render=render, images_total=len(work.image_files())), list(work.warnings)

    def live(self, progress: GenerateProgress, run: Run) -> GenerationJobStatus:
        if progress.images_total < 1:
            return GenerationJobStatus()
        done = progress.images_done
        return GenerationJobStatus(images_done=done, progress_text=f"{done}/{progress.images_total} images")

    def result(self, result: GenerateResult, run: Run) -> GenerationJobStatus:
        """URIs come from the RunSpec (`GenerateSpec.image_files`); from the pod only the texts and timings."""
        work = self.work(run)
        base = run.runspec.output_display_uri
        seconds = {item.index: item.seconds for item in result.images if item.seconds is not None}
        images = [
            GeneratedImage(uri=f"{base}/{image_file(name)}", prompt_index=p + 1, seed=seed, seconds=seconds.get(i + 1))
            for i, (p, seed, name) in enumerate(work.image_files())
        ]
        used, reformulated = result.prompts_used, result.reformulated
        prompts = [
            GeneratedPrompt(
                index=i + 1,
                prompt_used=used[i] if i < len(used) else prompt,
                reformulated=i < len(reformulated) and reformulated[i],
            )
            for i, prompt in enumerate(work.prompts)
        ]
        total = len(images)
        return GenerationJobStatus(
            images=images,
            prompts=prompts,
            contact_sheet_uri=f"{base}/{CONTACT_SHEET}",
            images_done=total,
            progress_text=f"{total}/{total} images",
        )


def capped_images(spec: GenerationJobSpec, cfg: OperatorConfig) -> tuple[tuple[str, ...], int, list[str]]:
    """(prompts, images per prompt) within the operator's generationLimits.maxImages, and a warning when capped:
    fewer seeds per prompt first, so every prompt is still rendered; then the first prompts only."""
    cap, prompts, count = cfg.generation_limits.max_images, tuple(spec.prompts), spec.count
    if not cap or len(prompts) * count <= cap:
        return prompts, count, []
    kept = prompts[:cap]
    per_prompt = max(1, cap // len(kept))
    warning = (
        f"images capped at {len(kept) * per_prompt} ({len(kept)} prompts x {per_prompt}; asked {len(prompts)} x "
        f"{count} = {len(prompts) * count}) by the operator's generationLimits"
    )
    return kept, per_prompt, [warning]


def capped_render(spec: GenerationJobSpec, cfg: OperatorConfig) -> tuple[int, int, int, list[str]]:
    """(width, height, steps) within the operator's generationLimits, and a warning for each cap applied."""
    limits = cfg.generation_limits
    width, height, steps, warnings = spec.width, spec.height, spec.steps, []
    if limits.max_side and max(width, height) > limits.max_side:
        scale = limits.max_side / max(width, height)
        width, height = (max(64, int(side * scale) // 16 * 16) for side in (spec.width, spec.height))
        warnings.append(
            f"size capped at {width}x{height} (asked {spec.width}x{spec.height}) by the operator's generationLimits"
        )
    if limits.max_steps and steps > limits.max_steps:
        steps = limits.max_steps
        warnings.append(f"steps capped at {steps} (asked {spec.steps}) by the operator's generationLimits")
    return width, height, steps, warnings
