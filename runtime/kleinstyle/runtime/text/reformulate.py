"""L2, prompt reformulation: a STYLE_PROFILE and a user's prompt become one 100-200 word prompt.

The write-up's rules (docs/policy.md), given to the model verbatim in spirit: the style wins every visual decision
(colours, textures, lighting), the user wins subject, action and content; wardrobe is translated into the style's
wardrobe language for the subject's gender; a generic environment becomes the style's own; signature elements are
never dropped; mood words must not flatten the palette's saturation. PROMPT_SUFFIX_MUST is always appended.

Every answer is checked (`check_reformulation`: length, the user's subject kept, the MUST suffix present) and asked
again once with the problems named. If the second answer still fails, a missing suffix is appended and a length
outside 100-200 words is accepted with a note; an answer that lost the user's subject is not used at all: the
prompt falls back to the user's own words with the trigger word and the MUST suffix (the user wins on content).

Whether generation reformulates at all is not decided here: it is the TrainingPlan's `text_pipeline` decision
(contract.plan), which generation applies (runtime.prompts builds the reformulator from this module).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from kleinstyle.contract.style_profile import StyleProfile
from pydantic import BaseModel, Field

from .captions import with_trigger
from .client import TextClient
from .providers import AnswerRejected, Prompt, answer_schema

log = logging.getLogger(__name__)

REFORMULATE_PROMPT_VERSION = "reformulate-v1"
MIN_WORDS, MAX_WORDS = 100, 200
REFORMULATE_SYSTEM = """\
You rewrite a user's image prompt so that a style LoRA model renders it in the style described by STYLE_PROFILE.

Rules:
1. The user wins on content: keep the user's subject (use the same noun), its action and everything the user asked
   to be in the picture.
2. The style wins on every visual decision: colours, textures, lighting and mood come from MUST_APPLY, whatever the
   user's prompt says about them.
3. Wardrobe: translate clothing into WARDROBE_LANGUAGE, adapted to the subject's gender (for a man, a "pink ruffle
   blouse" becomes something like "dusty rose cashmere").
4. Environment: a generic setting (an office, a street, a room) becomes the style's own ENVIRONMENT; a specific
   place the user names stays and takes the style.
5. SIGNATURE_ELEMENTS are non-negotiable: include them.
6. Colour accuracy: keep the palette's exact colours and saturation; mood words must never desaturate or flatten it.
7. {trigger_rule}End with PROMPT_SUFFIX_MUST exactly as given; put PROMPT_SUFFIX_ENRICH before it when the scene
   is compatible.
8. Write {min_words} to {max_words} words in one paragraph of plain descriptive prose: no lists, no quotes, no
   negations, no commentary."""
REFORMULATE_REQUEST = "STYLE_PROFILE:\n{profile}\n\nUser prompt: {prompt}"
RETRY_NOTE = "Your previous prompt was rejected: {problems}. Write it again following every rule."

Origin = Literal["reformulated", "repaired", "fallback", "passthrough"]


class ReformulationAnswer(BaseModel):
    prompt: str = Field(min_length=20, max_length=3000, description="The rewritten prompt, one paragraph.")


class Reformulation(BaseModel):
    """The prompt generation uses, and how it was made (`problems`: what the checks found in the last answer)."""

    prompt: str
    original: str
    origin: Origin
    words: int
    attempts: int = 0
    problems: list[str] = Field(default_factory=list)


# --- pure checks -------------------------------------------------------------------------------------------------

_ARTICLES = frozenset(
    {
        "a", "an", "the", "one", "two", "three", "four", "five", "some", "several", "many",
        "his", "her", "their", "my", "our", "its", "this", "that",
    }
)  # fmt: skip
_FRAMING = frozenset(
    {
        "portrait", "photo", "photograph", "picture", "image", "close-up", "closeup", "shot", "painting", "drawing",
        "illustration", "scene", "view",
    }
)  # fmt: skip
# Prepositions, conjunctions and the commonest verbs of image prompts: where a subject's noun phrase ends.
_BOUNDARIES = frozenset(
    {
        "in", "on", "at", "with", "under", "near", "beside", "by", "from", "into", "over", "behind", "above", "below",
        "of", "for", "and", "or", "but", "who", "that", "which", "while", "as", "is", "are", "was",
        "stands", "standing", "sits", "sitting", "walks", "walking", "runs", "running", "holds", "holding", "wears",
        "wearing", "looks", "looking", "plays", "playing", "reads", "reading", "rides", "riding", "lies", "lying",
        "leans", "leaning", "poses", "posing", "eats", "eating", "drinks", "drinking", "works", "working", "waits",
        "waiting", "smiles", "smiling", "jumps", "jumping", "flies", "flying", "swims", "swimming", "sleeps",
        "sleeping", "carries", "carrying", "watches", "watching", "gazes", "gazing", "dances", "dancing", "mends",
        "mending",
    }
)  # fmt: skip
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "foot": "feet", "mouse": "mice"}


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", text)


def word_count(text: str) -> int:
    return len(words_of(text))


def subject_of(prompt: str) -> str | None:
    """The head noun of the prompt's first noun phrase ("a man in a blouse ..." -> "man"), found without a
    parser: the last word before the first preposition, conjunction, common verb or punctuation, skipping a
    framing phrase ("portrait of ..."). None when the prompt has no such word."""
    chunks = re.split(r"[,.;:!?()]", prompt.lower())
    for chunk in chunks:
        words = words_of(chunk)
        phrase: list[str] = []
        for word in words:
            if word in _BOUNDARIES:
                if phrase and phrase[-1] in _FRAMING and word == "of":
                    phrase = []  # "portrait of an old fisherman": the subject is the fisherman
                    continue
                if phrase:
                    break
                continue
            if word not in _ARTICLES:
                phrase.append(word)
        if phrase:
            return phrase[-1]
    return None


def _forms(word: str) -> set[str]:
    forms = {word}
    for singular, plural in _IRREGULAR.items():
        if word in (singular, plural):
            forms |= {singular, plural}
    if word.endswith("es"):
        forms |= {word[:-2], word[:-1]}
    elif word.endswith("s"):
        forms.add(word[:-1])
    else:
        forms |= {word + "s", word + "es"}
    return forms


def mentions(text: str, word: str) -> bool:
    """Whether `text` uses `word` as a whole word, singular or plural."""
    present = {w.lower() for w in words_of(text)}
    return bool(_forms(word.lower()) & present)


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def check_reformulation(text: str, user_prompt: str, profile: StyleProfile, trigger: str | None) -> list[str]:
    """What is wrong with a reformulated prompt; empty when it passes."""
    problems = []
    count = word_count(text)
    if not MIN_WORDS <= count <= MAX_WORDS:
        problems.append(f"it has {count} words; it must have {MIN_WORDS} to {MAX_WORDS}")
    subject = subject_of(user_prompt)
    if subject and not mentions(text, subject):
        problems.append(f"it drops the user's subject '{subject}'")
    if _normal(profile.prompt_suffix_must) not in _normal(text):
        problems.append("it does not contain PROMPT_SUFFIX_MUST word for word")
    if trigger and not text.lstrip().startswith(trigger):
        problems.append(f"it does not start with the trigger word '{trigger}'")
    return problems


def passthrough(prompt: str, trigger: str | None) -> Reformulation:
    """The user's prompt as generation takes it with the text pipeline off: trigger word first, nothing else."""
    text = with_trigger(prompt, trigger) if trigger else " ".join(prompt.split())
    return Reformulation(prompt=text, original=prompt, origin="passthrough", words=word_count(text))


def fallback(
    prompt: str, profile: StyleProfile, trigger: str | None, problems: list[str], attempts: int
) -> Reformulation:
    """The user's own words with the MUST suffix, when no answer could be used (the user wins on content)."""
    base = passthrough(prompt, trigger).prompt.rstrip(" .,")
    text = f"{base}, {profile.prompt_suffix_must.strip()}"
    return Reformulation(
        prompt=text, original=prompt, origin="fallback", words=word_count(text), attempts=attempts, problems=problems
    )


def _repaired(text: str, profile: StyleProfile, trigger: str | None) -> str:
    """A second failed answer, with what can be fixed without the model: the trigger and the MUST suffix."""
    if trigger and not text.lstrip().startswith(trigger):
        text = with_trigger(text, trigger)
    if _normal(profile.prompt_suffix_must) not in _normal(text):
        text = f"{text.rstrip(' .,')}, {profile.prompt_suffix_must.strip()}"
    return text


# --- the call ----------------------------------------------------------------------------------------------------


def reformulation_prompt(profile: StyleProfile, prompt: str, trigger: str | None) -> Prompt:
    trigger_rule = f'Start with the trigger word "{trigger}." ' if trigger else ""
    return Prompt(
        system=REFORMULATE_SYSTEM.format(trigger_rule=trigger_rule, min_words=MIN_WORDS, max_words=MAX_WORDS),
        text=REFORMULATE_REQUEST.format(profile=profile.model_dump_json(by_alias=True, indent=2), prompt=prompt),
        schema=answer_schema(ReformulationAnswer),
        schema_name="reformulated_prompt",
        temperature=0.7,
    )


def reformulate(client: TextClient, profile: StyleProfile, prompt: str, trigger: str | None = None) -> Reformulation:
    """The L2 prompt for `prompt` under `profile` (see the module docstring for the checks and the fallback).

    Raises ProviderUnavailable / ProviderRefused when the provider cannot answer; an unusable answer ends in the
    fallback instead, with the problems recorded.
    """
    what = f"prompt {prompt[:40]!r}"
    request = reformulation_prompt(profile, prompt, trigger)
    problems: list[str] = []
    text = ""
    for attempt in (1, 2):
        asked = request if attempt == 1 else request.with_note(RETRY_NOTE.format(problems="; ".join(problems)))
        try:
            text = " ".join(
                client.ask("reformulate", REFORMULATE_PROMPT_VERSION, asked, ReformulationAnswer, what).prompt.split()
            )
        except AnswerRejected as exc:
            return fallback(prompt, profile, trigger, [str(exc)], attempt)
        problems = check_reformulation(text, prompt, profile, trigger)
        if not problems:
            return Reformulation(
                prompt=text, original=prompt, origin="reformulated", words=word_count(text), attempts=attempt
            )
        log.info("%s: reformulation %d rejected: %s", what, attempt, "; ".join(problems))
    repaired = _repaired(text, profile, trigger)
    remaining = check_reformulation(repaired, prompt, profile, trigger)
    if any("subject" in problem for problem in remaining):
        return fallback(prompt, profile, trigger, problems, 2)
    return Reformulation(
        prompt=repaired, original=prompt, origin="repaired", words=word_count(repaired), attempts=2, problems=problems
    )
