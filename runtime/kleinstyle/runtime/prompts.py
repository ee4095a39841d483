"""The prompts a GenerationJob renders: raw, or reformulated by L2 with a fallback to raw that always says why.

The policy (which mode, the trigger words) is the contract's `prompt_policy`, decided by the operator. Reformulated
prompts are the L2 reformulation (`kleinstyle.runtime.text`) of the user prompt in the board's STYLE_PROFILE,
trigger words in front as well (the LoRA was trained to answer to them), built by `load_reformulator`. Whenever it
is unavailable (no profile, no API key, an API error for one prompt), that prompt falls back to the raw form and a
warning says why: never a silent change of behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kleinstyle.contract.prompt_policy import PromptMode, with_triggers
from kleinstyle.contract.runspec import GenerateSpec

# A user prompt in, the reformulated prompt out; raises ReformulationError when it cannot.
Reformulator = Callable[[str], str]


class ReformulationError(Exception):
    """The reformulator could not produce a prompt (an API error, an empty answer); the raw prompt is used."""


class ReformulationUnavailable(ReformulationError):
    """No reformulation is possible for this job at all (no style profile, no API key, not in this build)."""


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
    from kleinstyle.contract.style_profile import StyleProfile

    from .text.cache import AnswerCache
    from .text.client import TextClient
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
