"""Captions, L1 and L2 through a provider on loopback: the checks, the re-asks and what each outcome records."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest
from kleinstyle.contract.style_profile import StyleProfile
from kleinstyle.runtime.text.captions import CaptionTask, check_given, generate_caption, generate_captions
from kleinstyle.runtime.text.profile import extract_profile
from kleinstyle.runtime.text.providers import AnswerRejected, ImagePart
from kleinstyle.runtime.text.reformulate import reformulate
from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import Clients, ModelRequest, ModelServer

TRIGGER = "bd9style"
PROFILE_DOC = {
    "MUST_APPLY": {
        "COLOR": "saturated crimson and ivory, high contrast, the red never muted",
        "TEXTURE": "heavy silk and polished marble",
        "LIGHTING": "soft warm side light from a tall window",
        "MOOD": "quiet, ceremonial",
    },
    "ENRICH": {
        "SIGNATURE_ELEMENTS": "floating rose petals",
        "WARDROBE_LANGUAGE": "draped silk, high collars",
        "ENVIRONMENT": "a marble hall with tall windows",
        "CAMERA": "85mm portrait lens, shallow depth of field",
    },
    "PROMPT_SUFFIX_MUST": "saturated crimson and ivory palette, heavy silk, soft warm side light, ceremonial mood",
    "PROMPT_SUFFIX_ENRICH": "floating rose petals, marble hall with tall windows",
}
PROFILE = StyleProfile.model_validate(PROFILE_DOC)


def image(seed: int) -> ImagePart:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (seed * 40 % 256, 90, 160)).save(buffer, "PNG")
    return ImagePart.from_image_bytes(buffer.getvalue())


def captions_by_turn(server: ModelServer, *answers: str):
    """Answer caption requests in turn: the n-th caption request gets answers[n]."""

    def respond(request: ModelRequest):
        turn = len(server.calls("caption")) - 1
        return server.answer({"caption": answers[min(turn, len(answers) - 1)]})

    return respond


# --- captions -----------------------------------------------------------------------------------------------------


def test_a_content_caption_is_taken_as_it_is(model_server: ModelServer, clients: Clients) -> None:
    model_server.respond = captions_by_turn(model_server, "A woman with white hair stands beside a white horse")
    caption = generate_caption(clients(model_server), image(1), TRIGGER, "001.png")
    assert caption.text == "bd9style. A woman with white hair stands beside a white horse"
    assert (caption.origin, caption.style_words) == ("generated", ())


def test_a_caption_describing_style_is_asked_again_naming_the_words(
    model_server: ModelServer, clients: Clients
) -> None:
    model_server.respond = captions_by_turn(
        model_server, "A moody, cinematic shot of a lighthouse", "A lighthouse on a rocky shore"
    )
    caption = generate_caption(clients(model_server), image(1), TRIGGER, "001.png")
    assert caption.text == "bd9style. A lighthouse on a rocky shore"
    assert caption.origin == "regenerated" and caption.style_words == ("moody", "cinematic")
    first, second = model_server.calls("caption")
    assert "moody, cinematic" in second.text and "moody" not in first.text
    assert second.image_count == 1


def test_a_caption_still_describing_style_is_cleaned_and_says_so(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = captions_by_turn(
        gemini_server, "A moody lighthouse, cinematic", "A lighthouse on a rocky shore, bathed in warm tones"
    )
    caption = generate_caption(clients(gemini_server), image(1), TRIGGER, "001.png")
    assert caption.text == "bd9style. A lighthouse on a rocky shore"
    assert caption.origin == "cleaned" and caption.note == "removed: warm tones"
    assert caption.style_words == ("moody", "cinematic", "warm tones")


def test_a_caption_that_is_only_style_leaves_the_trigger_word(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = captions_by_turn(gemini_server, "Moody and cinematic")
    caption = generate_caption(clients(gemini_server), image(1), TRIGGER, "001.png")
    assert (caption.text, caption.origin) == (TRIGGER, "trigger-only")


def test_the_model_repeating_the_trigger_word_is_not_doubled(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = captions_by_turn(gemini_server, "bd9style, a fox asleep under a tree")
    caption = generate_caption(clients(gemini_server), image(1), TRIGGER)
    assert caption.text == "bd9style. a fox asleep under a tree"


def test_user_captions_are_kept_and_flagged() -> None:
    flagged = check_given("a watercolor fox, pastel palette", TRIGGER)
    assert flagged.text == "bd9style. a watercolor fox, pastel palette"
    assert (flagged.origin, flagged.style_words) == ("given", ("watercolor", "pastel", "palette"))
    assert flagged.note == "describes style: watercolor, pastel, palette"
    assert check_given("bd9style, a fox", TRIGGER).style_words == ()


def test_user_captions_naming_the_trigger_word_in_their_text_are_flagged() -> None:
    flagged = check_given("bd9style. a bd9style house by a lake", TRIGGER)
    assert flagged.text == "bd9style. a bd9style house by a lake"  # kept as written
    assert (flagged.origin, flagged.style_words) == ("given", ("bd9style",))
    assert flagged.note == "names the trigger word bd9style in its text"
    both = check_given("a watercolor Bd9style house", TRIGGER)
    assert both.style_words == ("watercolor", "bd9style")
    assert both.note == "describes style: watercolor; names the trigger word bd9style in its text"
    assert check_given("bd9style, a house by a lake", TRIGGER).style_words == ()


def test_a_caption_naming_the_trigger_word_is_asked_again(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = captions_by_turn(gemini_server, "A bd9style house by a lake", "A house by a lake")
    caption = generate_caption(clients(gemini_server), image(1), TRIGGER, "001.png")
    assert caption.text == "bd9style. A house by a lake"
    assert caption.origin == "regenerated" and caption.style_words == ("bd9style",)
    _first, second = gemini_server.calls("caption")
    assert "used the word bd9style" in second.text and "described how the image looks" not in second.text


def test_a_caption_still_naming_the_trigger_word_loses_it(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = captions_by_turn(gemini_server, "A bd9style house, moody", "A bd9style house by a lake")
    caption = generate_caption(clients(gemini_server), image(1), TRIGGER, "001.png")
    assert caption.text == "bd9style. A house by a lake"
    assert caption.origin == "cleaned" and caption.note == "removed: bd9style"
    assert caption.style_words == ("bd9style", "moody")


def test_one_failing_image_does_not_lose_the_others(gemini_server: ModelServer, clients: Clients) -> None:
    images = {f"00{i}.png": image(i) for i in range(1, 5)}
    blocked_image = images["003.png"]

    def respond(request: ModelRequest):
        sent = request.body["contents"][0]["parts"][0]["inlineData"]["data"]
        if sent.replace("-", "+").replace("_", "/") == __import__("base64").b64encode(blocked_image.data).decode():
            return gemini_server.blocked()
        return gemini_server.answer({"caption": "a fox asleep under a tree"})

    gemini_server.respond = respond
    tasks = [CaptionTask(name, lambda part=part: part) for name, part in images.items()]
    results = generate_captions(clients(gemini_server), tasks, TRIGGER, workers=3)
    assert [type(r).__name__ for r in results] == ["Caption", "Caption", "AnswerRejected", "Caption"]
    assert "003.png" in str(results[2]) and "SAFETY" in str(results[2])


# --- L1 -------------------------------------------------------------------------------------------------------------


def test_profile_is_extracted_with_the_documents_structure(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer(PROFILE_DOC)]
    client = clients(model_server)
    profile = extract_profile(client, [image(i) for i in range(3)])
    assert profile.must_apply.color.startswith("saturated crimson")
    assert profile.enrich.signature_elements == "floating rose petals"
    assert profile.document() == PROFILE_DOC
    (request,) = model_server.requests
    assert request.schema_name == "style_profile" and request.image_count == 3
    assert client.ledger.summary().by_purpose == {"style-profile": 120}


def test_a_profile_breaking_the_schema_is_asked_again_then_rejected(
    model_server: ModelServer, clients: Clients
) -> None:
    no_enrich = {k: v for k, v in PROFILE_DOC.items() if k != "ENRICH"}
    empty_mood = {**PROFILE_DOC, "MUST_APPLY": {**PROFILE_DOC["MUST_APPLY"], "MOOD": ""}}
    model_server.script = [model_server.answer(no_enrich), model_server.answer(empty_mood)]
    with pytest.raises(AnswerRejected, match=r"MUST_APPLY\.MOOD: String should have at least 2 characters"):
        extract_profile(clients(model_server), [image(1)])
    assert "ENRICH: Field required" in model_server.requests[1].text


def test_profile_takes_one_to_ten_references(gemini_server: ModelServer, clients: Clients) -> None:
    with pytest.raises(ValueError, match="1 to 10 references, not 11"):
        extract_profile(clients(gemini_server), [image(i) for i in range(11)])


# --- L2 -------------------------------------------------------------------------------------------------------------


def prompt_of(words: int, subject: str = "man", suffix: bool = True) -> str:
    body = f"bd9style. A {subject} in dusty rose cashmere stands in a marble hall among floating rose petals."
    suffix_words = len(PROFILE_DOC["PROMPT_SUFFIX_MUST"].split()) if suffix else 0
    text = " ".join([body] * (words // 16 + 1)).split()[: words - suffix_words]
    return " ".join(text) + (f" {PROFILE_DOC['PROMPT_SUFFIX_MUST']}" if suffix else "")


def test_reformulation_keeps_the_rules_and_passes_its_checks(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer({"prompt": prompt_of(150)})]
    result = reformulate(clients(model_server), PROFILE, "a man in a pink ruffle blouse in an office", TRIGGER)
    assert (result.origin, result.attempts, result.problems) == ("reformulated", 1, [])
    assert 100 <= result.words <= 200 and result.prompt.startswith(TRIGGER)
    (request,) = model_server.requests
    system = request.body["systemInstruction"]["parts"][0]["text"] if model_server.protocol == "gemini" else (
        request.body["messages"][0]["content"]
    )  # fmt: skip
    for rule in ("Wardrobe", "gender", "ENVIRONMENT", "SIGNATURE_ELEMENTS", "saturation", 'trigger word "bd9style."'):
        assert rule in system
    assert "floating rose petals" in request.text and "pink ruffle blouse" in request.text


def test_a_too_short_reformulation_is_asked_again(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.script = [
        gemini_server.answer({"prompt": prompt_of(40)}),
        gemini_server.answer({"prompt": prompt_of(120)}),
    ]
    result = reformulate(clients(gemini_server), PROFILE, "a man in an office", TRIGGER)
    assert (result.origin, result.attempts) == ("reformulated", 2)
    assert "it has 40 words; it must have 100 to 200" in gemini_server.requests[1].text


def test_a_reformulation_that_drops_the_subject_twice_falls_back(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = lambda request: gemini_server.answer({"prompt": prompt_of(150, subject="woman")})
    result = reformulate(clients(gemini_server), PROFILE, "a fisherman in an office", TRIGGER)
    assert result.origin == "fallback" and result.attempts == 2
    assert result.prompt == f"bd9style. a fisherman in an office, {PROFILE_DOC['PROMPT_SUFFIX_MUST']}"
    assert result.problems == ["it drops the user's subject 'fisherman'"]
    assert "it drops the user's subject 'fisherman'" in gemini_server.requests[1].text


def test_a_missing_suffix_is_appended_after_the_second_try(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = lambda request: gemini_server.answer({"prompt": prompt_of(150, suffix=False)})
    result = reformulate(clients(gemini_server), PROFILE, "a man in an office", TRIGGER)
    assert result.origin == "repaired" and result.prompt.endswith(PROFILE_DOC["PROMPT_SUFFIX_MUST"])
    assert result.problems == ["it does not contain PROMPT_SUFFIX_MUST word for word"]


def test_an_unusable_reformulation_answer_falls_back(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.respond = lambda request: gemini_server.blocked()
    result = reformulate(clients(gemini_server), PROFILE, "a man in an office", TRIGGER)
    assert result.origin == "fallback" and "blocked it" in result.problems[0]
