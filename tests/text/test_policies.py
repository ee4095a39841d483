"""The pure rules of the text pipeline, table-driven: the style vocabulary and its cleaner, the backoff policy, the
diverse subset, the subject heuristic and the reformulation checks."""

from __future__ import annotations

import pytest
from kleinstyle.contract.style_profile import StyleProfile
from kleinstyle.runtime.text.profile import diverse_subset
from kleinstyle.runtime.text.reformulate import check_reformulation, mentions, passthrough, subject_of, word_count
from kleinstyle.runtime.text.retry import (
    GaveUp,
    RetryPolicy,
    Transient,
    backoff_s,
    call_with_retries,
    parse_duration,
    parse_retry_after,
)
from kleinstyle.runtime.text.vocabulary import clean_caption, style_words

# --- captions: what they show, never how it looks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "words"),
    [
        # The write-up's correct caption (docs/policy.md#captions): plain colours of things are content.
        ("A woman with flowing white hair stands beside a white horse in a grassy field", []),
        # ... and its wrong one.
        (
            "Red and white editorial fashion, moody atmospheric lighting",
            ["editorial", "moody", "atmospheric", "lighting"],
        ),
        ("A watercolor painting of a fox, shallow depth of field", ["watercolor painting", "shallow depth of field"]),
        ("a man in a doorway, film-grain, low key, bokeh", ["film-grain", "low key", "bokeh"]),
        ("Cinematic shot of a lighthouse bathed in warm tones", ["cinematic", "warm tones"]),
        ("an art deco hotel lobby, 35mm, Kodak Portra", ["art deco", "35mm", "kodak", "portra"]),
        # Content that looks like style words, and is not: a child painting, a field of grain, a lit candle.
        ("a child painting a fence next to a field of grain and a lit candle", []),
        ("a photo pinned to a wall beside a camera lens", []),
    ],
)
def test_style_words(caption: str, words: list[str]) -> None:
    assert style_words(caption) == words


@pytest.mark.parametrize(
    ("caption", "cleaned"),
    [
        ("bd9style. Red and white editorial fashion, moody atmospheric lighting", "bd9style. Red and white fashion"),
        ("A watercolor painting of a fox under soft golden-hour light, with shallow depth of field", "a fox"),
        ("A cinematic shot of a lighthouse on a rocky shore, bathed in warm tones", "A shot of a lighthouse on a rocky "
         "shore"),
        ("Two dancers on a stage, dreamy and ethereal", "Two dancers on a stage"),
        ("A girl reading a book.", "A girl reading a book."),
        ("Moody, cinematic.", ""),
    ],
)  # fmt: skip
def test_clean_caption_keeps_content_and_drops_style(caption: str, cleaned: str) -> None:
    assert clean_caption(caption) == cleaned
    assert style_words(clean_caption(caption)) == []


# --- retries ------------------------------------------------------------------------------------------------------

POLICY = RetryPolicy(attempts=4, base_s=1.0, cap_s=5.0, max_server_wait_s=30.0, deadline_s=20.0)


@pytest.mark.parametrize(
    ("retry", "retry_after", "rand", "expected"),
    [
        (1, None, 0.5, 0.5),  # full jitter over [0, 1)
        (2, None, 0.5, 1.0),  # the ceiling doubles
        (3, None, 0.99, 3.96),
        (6, None, 1.0, 5.0),  # capped
        (1, 7.0, 0.5, 7.0),  # the server's wait is a floor
        (4, 2.0, 0.9, 4.5),  # ... that a longer backoff overrides
    ],
)
def test_backoff(retry: int, retry_after: float | None, rand: float, expected: float) -> None:
    assert backoff_s(POLICY, retry, retry_after, rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "12"}, 12.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),  # an HTTP date, 10 s after "now"
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(headers, now=now) == expected


def test_parse_duration() -> None:
    assert (parse_duration("37s"), parse_duration("1.5s"), parse_duration("soon"), parse_duration(3)) == (
        37.0,
        1.5,
        None,
        None,
    )


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(*errors: Exception, then: str = "ok"):
    queue = list(errors)

    def send() -> str:
        if queue:
            raise queue.pop(0)
        return then

    return send


def test_retries_until_success_with_the_servers_wait() -> None:
    clock = FakeTime()
    send = failing(Transient("429", retry_after=3.0), Transient("503"))
    result = call_with_retries(send, POLICY, "x", sleep=clock.sleep, clock=lambda: clock.now, rand=lambda: 0.5)
    assert result == "ok" and clock.sleeps == [3.0, 1.0]


def test_attempts_are_bounded() -> None:
    clock = FakeTime()
    send = failing(*[Transient("503 overloaded")] * 10)
    with pytest.raises(GaveUp, match="503 overloaded \\(gave up after 4 attempts\\)"):
        call_with_retries(send, POLICY, "x", sleep=clock.sleep, clock=lambda: clock.now, rand=lambda: 0.5)
    assert len(clock.sleeps) == 3


def test_the_deadline_bounds_the_waits() -> None:
    clock = FakeTime()
    send = failing(*[Transient("429", retry_after=15.0)] * 3)
    with pytest.raises(GaveUp, match="no time left for another try within 20 s"):
        call_with_retries(send, POLICY, "x", sleep=clock.sleep, clock=lambda: clock.now, rand=lambda: 0.0)
    assert clock.sleeps == [15.0]


def test_other_errors_are_not_retried() -> None:
    clock = FakeTime()
    with pytest.raises(KeyError):
        call_with_retries(failing(KeyError("bug")), POLICY, "x", sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.sleeps == []


# --- L1: the references a profile sees --------------------------------------------------------------------------


def test_diverse_subset_keeps_one_of_each_look_alike_group_first() -> None:
    group_a, group_b, group_c = 0x0, 0xFFFF_FFFF_0000_0000, 0x0000_0000_FFFF_FFFF
    hashes = [group_a, group_a | 1, group_a | 2, group_b, group_b & ~(1 << 40), group_c]
    assert diverse_subset(hashes, 3) == [0, 3, 5]  # one per group, ties to the earlier image
    assert diverse_subset(hashes, 4) == [0, 1, 3, 5]
    assert diverse_subset(hashes[:2], 10) == [0, 1]


def test_diverse_subset_is_bounded_and_deterministic() -> None:
    hashes = [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(40)]
    chosen = diverse_subset(hashes)
    assert len(chosen) == 10 and chosen == sorted(set(chosen)) and chosen == diverse_subset(hashes)


# --- L2: the checks of a reformulated prompt -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("a man in a pink ruffle blouse working in an office", "man"),
        ("A woman with flowing white hair stands beside a white horse", "woman"),
        ("portrait of an old fisherman mending nets", "fisherman"),
        ("two cats playing chess on a rooftop", "cats"),
        ("a tall building at night", "building"),
        ("close-up of a red apple", "apple"),
        ("astronaut riding a horse", "astronaut"),
        ("", None),
    ],
)
def test_subject_of(prompt: str, subject: str | None) -> None:
    assert subject_of(prompt) == subject


def test_mentions_allows_plural_and_singular() -> None:
    assert mentions("Two cats on a roof", "cat") and mentions("A cat on a roof", "cats")
    assert mentions("three men at a table", "man") and not mentions("a manor house", "man")


PROFILE = StyleProfile.model_validate(
    {
        "MUST_APPLY": {"COLOR": "crimson and ivory", "TEXTURE": "silk", "LIGHTING": "soft side light", "MOOD": "calm"},
        "ENRICH": {"SIGNATURE_ELEMENTS": "floating petals", "WARDROBE_LANGUAGE": "draped silk", "ENVIRONMENT": "a "
                   "marble hall", "CAMERA": "85mm, shallow depth of field"},
        "PROMPT_SUFFIX_MUST": "crimson and ivory palette, silk textures, soft side light",
        "PROMPT_SUFFIX_ENRICH": "floating petals, marble hall",
    }
)  # fmt: skip


def test_check_reformulation_names_each_problem() -> None:
    body = "bd9style. A man in dusty rose cashmere stands in a marble hall among floating petals. " * 8
    good = f"{body}crimson and ivory palette, silk textures, soft side light"
    assert 100 <= word_count(good) <= 200
    assert check_reformulation(good, "a man in an office", PROFILE, "bd9style") == []
    problems = check_reformulation("bd9style. A cat in a hall.", "a man in an office", PROFILE, "bd9style")
    assert problems == [
        "it has 6 words; it must have 100 to 200",
        "it drops the user's subject 'man'",
        "it does not contain PROMPT_SUFFIX_MUST word for word",
    ]
    assert check_reformulation(good, "a man", PROFILE, "sks") == ["it does not start with the trigger word 'sks'"]


def test_passthrough_is_the_users_prompt_with_the_trigger() -> None:
    assert passthrough("a man  in an office", "bd9style").prompt == "bd9style. a man in an office"
    assert passthrough("bd9style, a man", "bd9style").prompt == "bd9style, a man"
    assert passthrough("a man", None).origin == "passthrough"
