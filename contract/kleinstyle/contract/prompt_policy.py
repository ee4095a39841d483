"""A GenerationJob's text-pipeline policy and raw prompts: pure, so the operator decides and the runtime applies.

- Policy (the write-up's "Gemini hurts 1-3 reference boards", docs/policy.md#the-text-pipeline): `textPipeline:
  auto` reformulates only when every LoRA's training plan keeps the text pipeline; one LoRA from a 1-3 reference
  board turns it off for the whole job, since a reformulated prompt would steer that LoRA too. `on` and `off` are
  the user's word.
- Raw prompts: the user prompt with the LoRAs' trigger words in front, `"bd9style. a fox at night"`, the way the
  training captions start; a trigger the prompt already names is not repeated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PromptMode = Literal["raw", "reformulate"]


@dataclass(frozen=True)
class LoraStyle:
    """What generation needs to know of one LoRA: its trigger words and whether its plan keeps the text pipeline.

    `text_pipeline` None: unknown (e.g. a fusion whose status does not say), which `auto` treats as off.
    """

    label: str
    trigger_words: tuple[str, ...] = ()
    text_pipeline: bool | None = None
    reason: str = ""


def decide_prompt_mode(setting: str, loras: Sequence[LoraStyle]) -> tuple[PromptMode, str]:
    """(prompt mode, why) for a GenerationJob's `textPipeline` setting (auto, on, off) and its LoRAs."""
    if setting == "off":
        return "raw", "textPipeline: off in the spec: the prompts are used as written, with the trigger words"
    if setting == "on":
        return "reformulate", "textPipeline: on in the spec"
    for lora in loras:
        if lora.text_pipeline is None:
            return "raw", f"auto: {lora.label} does not say whether its training plan keeps the text pipeline; off"
        if not lora.text_pipeline:
            why = f" ({lora.reason})" if lora.reason else ""
            return "raw", f"auto: the training plan of {lora.label} turns the text pipeline off{why}"
    return "reformulate", "auto: every LoRA's training plan keeps the text pipeline"


def with_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """`prompt` with the trigger words it does not already name in front: "bd9style, ink. a fox"."""
    text = " ".join(prompt.split())
    missing = [t for t in dict.fromkeys(triggers) if t and not _names(text, t)]
    return f"{', '.join(missing)}. {text}" if missing else text


def _names(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None
