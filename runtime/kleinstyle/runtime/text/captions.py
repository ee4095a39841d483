"""Content-only captions: what an image depicts, never how it looks, after the trigger word.

The caption strategy (docs/policy.md#captions): whatever a caption names is tied to text tokens, whatever it leaves out
is absorbed into the LoRA, so a style LoRA's captions must name the content and nothing of the style. Every
caption, the provider's and the user's, goes through the style-descriptor check (vocabulary.py):
- a provider's caption that describes style is asked for again, naming the offending words; if the second still
  does, the words are cut out (`clean_caption`) and the outcome says so;
- a caption the user wrote is kept as written (it is their dataset) and flagged with the words it should lose.
The trigger word counts as such a word inside the text (after the one in front): "bd9style. a bd9style house" ties
the style token to houses, so it is flagged, asked again for and cut out like a style descriptor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kleinstyle.contract.reports import CaptionOrigin
from pydantic import BaseModel, Field

from .client import TextClient
from .providers import ImagePart, Prompt, TextError, answer_schema
from .vocabulary import clean_caption, style_words

log = logging.getLogger(__name__)

CAPTION_PROMPT_VERSION = "caption-v1"
CAPTION_SYSTEM = """\
You write training captions for a style LoRA. A caption must say WHAT the image depicts and never HOW it looks.

Describe: the subjects (who or what, how many), what they do and their pose, clothing items and objects, the
setting or place, and the framing (close-up, full body, wide view). Plain colours of individual things are fine when
they identify them ("a white horse", "a red scarf").

Never describe the look: no palette, colour scheme or tones; no lighting, shadows or time-of-day light; no mood or
atmosphere; no medium (painting, photo, watercolor, illustration, render); no texture, grain or brushwork; no camera,
lens, film or focus terms; no art movement or style names; no quality words (detailed, cinematic, aesthetic).

Write one plain sentence of 10 to 40 words. Do not start with "An image of" or "A photo of". Do not add a trigger
word or any preamble."""
CAPTION_REQUEST = "Caption this image."
RECAPTION_NOTE = (
    "Your caption described how the image looks with: {words}. Caption the same image again, naming only what it "
    "depicts and none of those words."
)
RECAPTION_TRIGGER_NOTE = (
    "Your caption used the word {trigger}, which the training adds by itself. Caption the same image again without "
    "that word."
)

Origin = CaptionOrigin  # where a caption came from, as StyleBoard status shows it


class CaptionAnswer(BaseModel):
    caption: str = Field(min_length=3, max_length=400, description="What the image depicts, in one sentence.")


@dataclass(frozen=True)
class Caption:
    """A caption and how it was obtained; `style_words` are those the check found in the text as it stands
    (user captions) or in the provider's rejected answers (cleaned, regenerated)."""

    text: str
    origin: Origin
    style_words: tuple[str, ...] = ()
    note: str = ""


def starts_with_trigger(caption: str, trigger: str) -> bool:
    """Whether `caption` opens with the trigger word as a whole word ("sks, a cat" yes; "sksx" no)."""
    if not caption.startswith(trigger):
        return False
    rest = caption[len(trigger) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def with_trigger(text: str, trigger: str) -> str:
    """`text` on one line (ai-toolkit reads a whole caption file as one caption), opening with the trigger word."""
    line = " ".join(text.split())
    if not line:
        return trigger
    return line if starts_with_trigger(line, trigger) else f"{trigger}. {line}"


def without_trigger(text: str, trigger: str) -> str:
    line = " ".join(text.split())
    if starts_with_trigger(line, trigger):
        line = line[len(trigger) :].lstrip(" .,:;-")
    return line


def flagged_words(text: str, trigger: str) -> list[str]:
    """The style words of a caption's text (the trigger word in front taken off), the trigger word among them when
    the text repeats it."""
    return style_words(without_trigger(text, trigger), (trigger,))


def _problems(words: Sequence[str], trigger: str) -> tuple[list[str], bool]:
    """(the style descriptors proper, whether the trigger word is among `words`)."""
    return [w for w in words if w != trigger.lower()], trigger.lower() in words


def check_given(text: str, trigger: str) -> Caption:
    """A caption the user wrote: kept as written (trigger added), flagged with any style words in it and with the
    trigger word when its text repeats it."""
    words = flagged_words(text, trigger)
    style, repeats = _problems(words, trigger)
    notes = [f"describes style: {', '.join(style)}"] if style else []
    notes += [f"names the trigger word {trigger} in its text"] if repeats else []
    return Caption(with_trigger(text, trigger), "given", tuple(words), "; ".join(notes))


def _recaption_note(words: Sequence[str], trigger: str) -> str:
    style, repeats = _problems(words, trigger)
    notes = [RECAPTION_NOTE.format(words=", ".join(style))] if style else []
    notes += [RECAPTION_TRIGGER_NOTE.format(trigger=trigger)] if repeats else []
    return " ".join(notes)


def caption_prompt(image: ImagePart) -> Prompt:
    return Prompt(
        system=CAPTION_SYSTEM,
        text=CAPTION_REQUEST,
        schema=answer_schema(CaptionAnswer),
        schema_name="caption",
        images=(image,),
        temperature=0.4,
    )


def generate_caption(client: TextClient, image: ImagePart, trigger: str, what: str = "") -> Caption:
    """The provider's content-only caption of `image`: checked, asked again once naming the style words it used,
    then cleaned if it still describes style. Raises TextError when the provider gives no usable answer."""
    prompt = caption_prompt(image)
    first = without_trigger(client.ask("caption", CAPTION_PROMPT_VERSION, prompt, CaptionAnswer, what).caption, trigger)
    words = flagged_words(first, trigger)
    if not words:
        return Caption(with_trigger(first, trigger), "generated")
    log.info("%s: the caption describes style (%s); asking again", what, ", ".join(words))
    again = prompt.with_note(_recaption_note(words, trigger))
    second = without_trigger(client.ask("caption", CAPTION_PROMPT_VERSION, again, CaptionAnswer, what).caption, trigger)
    still = flagged_words(second, trigger)
    if not still:
        return Caption(with_trigger(second, trigger), "regenerated", tuple(words), f"asked again: {', '.join(words)}")
    cleaned = clean_caption(second, (trigger,))
    removed = tuple(dict.fromkeys([*words, *still]))
    if not cleaned:
        return Caption(trigger, "trigger-only", removed, f"nothing but style words twice ({', '.join(still)})")
    return Caption(with_trigger(cleaned, trigger), "cleaned", removed, f"removed: {', '.join(still)}")


@dataclass(frozen=True)
class CaptionTask:
    """One image to caption; `name` is how messages refer to it (a file name, a source)."""

    name: str
    image: Callable[[], ImagePart]


def generate_captions(
    client: TextClient, tasks: Sequence[CaptionTask], trigger: str, workers: int = 4
) -> list[Caption | TextError]:
    """`generate_caption` for every task, `workers` at a time; a failure is returned in its task's place, so one
    image that fails never loses the others' answers (they are cached as well)."""

    def one(task: CaptionTask) -> Caption | TextError:
        try:
            return generate_caption(client, task.image(), trigger, task.name)
        except TextError as exc:
            log.warning("%s: no caption: %s", task.name, exc)
            return exc

    if workers <= 1 or len(tasks) <= 1:
        return [one(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption") as pool:
        return list(pool.map(one, tasks))
