"""What a GenerationJob renders for each prompt: the text-pipeline policy, trigger words, and the L2 seam.

Pure functions (no torch): the operator decides the policy from its LoRAs' training plans, the runtime applies it.

- Policy (the reference document, "Gemini hurts 1-3 ref datasets"): `textPipeline: auto` reformulates only when
  every LoRA's plan keeps the text pipeline; one LoRA from a 1-3 reference board turns it off for the whole job,
  since a reformulated prompt would steer that LoRA too. `on` and `off` are the user's word.
- Raw prompts: the user prompt with the LoRAs' trigger words in front, `"bd9style. a fox at night"`, the way the
  training captions start (`prepare.caption_for`); a trigger the prompt already names is not repeated.
- Reformulated prompts: the L2 reformulation (`kleinstyle.runtime.text`) of the user prompt in the board's
  STYLE_PROFILE, trigger words in front as well (the LoRA was trained to answer to them), built by
  `load_reformulator`. Whenever it is unavailable (no profile, no API key, an API error for one
  prompt), that prompt falls back to the raw form and a warning says why: never a silent change of behaviour.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .spec import GenerateSpec

# A user prompt in, the reformulated prompt out; raises ReformulationError when it cannot.
Reformulator = Callable[[str], str]
PromptMode = Literal["raw", "reformulate"]


class ReformulationError(Exception):
    """The reformulator could not produce a prompt (an API error, an empty answer); the raw prompt is used."""


class ReformulationUnavailable(ReformulationError):
    """No reformulation is possible for this job at all (no style profile, no API key, not in this build)."""


# --- policy ------------------------------------------------------------------------------------------------------


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


# --- the prompts a job renders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptUsed:
    prompt: str
    used: str
    reformulated: bool


def prompts_to_render(
    prompts: Sequence[str],
    mode: PromptMode,
    triggers: Sequence[str],
    reformulator: Callable[[], Reformulator],
) -> tuple[list[PromptUsed], list[str]]:
    """The prompt each user prompt becomes, and the warnings for every fallback to the raw form.

    `reformulator` is called once, only when `mode` is reformulate; ReformulationUnavailable from it turns the
    whole job raw with one warning, ReformulationError from one prompt turns that prompt raw.
    """
    raw = [PromptUsed(p, with_triggers(p, triggers), False) for p in prompts]
    if mode == "raw":
        return raw, []
    try:
        reformulate = reformulator()
    except ReformulationUnavailable as exc:
        return raw, [f"the text pipeline is on but reformulation is unavailable ({exc}): used the raw prompts"]
    out, warnings = [], []
    for index, plain in enumerate(raw):
        try:
            text = " ".join(reformulate(plain.prompt).split())
            if not text:
                raise ReformulationError("the reformulation came back empty")
        except ReformulationError as exc:
            warnings.append(f"prompt {index + 1}: reformulation failed ({exc}); the raw prompt was used")
            out.append(plain)
            continue
        out.append(PromptUsed(plain.prompt, with_triggers(text, triggers), True))
    return out, warnings


def load_reformulator(
    work: GenerateSpec, env: Mapping[str, str] | None = None, cache_uri: str | None = None
) -> Reformulator:
    """The L2 reformulation for `work` through `kleinstyle.runtime.text` (answers cached under `cache_uri`).

    What it needs is checked first (the style profile, the provider's API key from the Secret-filled env var), so a
    job without them falls back to raw prompts with the reason. The trigger words are added by `prompts_to_render`.
    """
    from .text.cache import AnswerCache
    from .text.client import TextClient
    from .text.profile import StyleProfile
    from .text.providers import NoApiKey, TextError, make_provider
    from .text.reformulate import reformulate

    env = os.environ if env is None else env
    if work.style_profile is None:
        raise ReformulationUnavailable("no style profile is known for these LoRAs")
    try:
        provider = make_provider(work.reformulation_provider, work.reformulation_model, env=env)
    except NoApiKey as exc:
        raise ReformulationUnavailable(str(exc)) from exc
    try:
        profile = StyleProfile.model_validate(work.style_profile)
    except ValueError as exc:
        raise ReformulationUnavailable(f"the style profile is not a valid STYLE_PROFILE: {exc}") from exc
    client = TextClient(provider, AnswerCache(cache_uri))

    def reformulated(prompt: str) -> str:
        try:
            result = reformulate(client, profile, prompt)
        except TextError as exc:
            raise ReformulationError(str(exc)) from exc
        if result.origin == "fallback":  # the answers were rejected: say so rather than call it reformulated
            raise ReformulationError(f"the reformulations were rejected: {'; '.join(result.problems)}")
        return result.prompt

    return reformulated
