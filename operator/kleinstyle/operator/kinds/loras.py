"""What a trained or fused LoRA tells the kinds that use it (GenerationJob, LoRAFusion): where its file is, its
trigger words, whether its training plan keeps the text pipeline, and the STYLE_PROFILE it carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kleinstyle.contract.layout import LORA_FILE
from kleinstyle.contract.prompt_policy import LoraStyle
from kleinstyle.contract.runspec import LoraInput

from ..api.generationjob import LoRAReference
from ..api.lorafusion import LoRAFusionStatus
from ..api.stylelora import StyleLoRAStatus
from ..config import OperatorConfig
from .base import Dependencies, Dependency, dependency_path


def lora_dependencies(refs: Sequence[LoRAReference]) -> list[Dependency]:
    return [Dependency(ref.kind, ref.name, LORA_FILE) for ref in refs]


def _status(ref: LoRAReference, deps: Dependencies) -> StyleLoRAStatus | LoRAFusionStatus:
    status = (deps[(ref.kind, ref.name)] or {}).get("status")
    return StyleLoRAStatus.read(status) if ref.kind == "StyleLoRA" else LoRAFusionStatus.read(status)


def lora_inputs(refs: Sequence[LoRAReference], deps: Dependencies, cfg: OperatorConfig) -> tuple[LoraInput, ...]:
    """Each LoRA's file where the pod reads it: the source's recorded run folder, never its `status.loraURI`."""
    return tuple(
        LoraInput(
            uri=dependency_path(cfg, ref.kind, deps[(ref.kind, ref.name)] or {}, LORA_FILE),
            weight=ref.weight,
            label=f"{ref.kind}/{ref.name}",
        )
        for ref in refs
    )


def lora_style(ref: LoRAReference, deps: Dependencies) -> LoraStyle:
    """A StyleLoRA: `triggerWord` and `plan.textPipeline` (with the variant's reason); a LoRAFusion: `triggerWords`
    and `textPipeline` where its status has them (unknown otherwise, which `auto` reads as off)."""
    status = _status(ref, deps)
    label = f"{ref.kind} {ref.name}"
    if isinstance(status, StyleLoRAStatus):
        keeps, reason = (status.plan.text_pipeline, status.plan.variant_reason or "") if status.plan else (None, "")
        words = [status.trigger_word]
    else:
        words = list(status.trigger_words)
        keeps, reason = status.text_pipeline, ""
    triggers = tuple(w for w in words if isinstance(w, str) and w)
    return LoraStyle(label, triggers, keeps if isinstance(keeps, bool) else None, reason)


def trigger_words(styles: Sequence[LoraStyle]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(word for style in styles for word in style.trigger_words))


def style_profile(refs: Sequence[LoRAReference], deps: Dependencies) -> dict[str, Any] | None:
    """The L1 STYLE_PROFILE the reformulation uses: the first LoRA's `status.styleProfile` (a StyleLoRA carries its
    board's; a fusion its first source's). None: prompts stay raw with a warning."""
    for ref in refs:
        profile = _status(ref, deps).style_profile
        if profile is not None:
            return profile
    return None
