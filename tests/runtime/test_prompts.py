"""The text-pipeline policy, trigger words and the reformulation fallbacks: pure functions, table-driven."""

from __future__ import annotations

import pytest
from kleinstyle.contract.prompt_policy import LoraStyle, decide_prompt_mode, with_triggers
from kleinstyle.contract.runspec import GenerateSpec
from kleinstyle.runtime.prompts import (
    ReformulationError,
    ReformulationUnavailable,
    load_reformulator,
    prompts_to_render,
)

BIG = LoraStyle("StyleLoRA big", ("bigstyle",), True, "12 references: GEM+A")
SMALL = LoraStyle("StyleLoRA small", ("smallstyle",), False, "3 references: rank 128 without the text pipeline")
FUSED = LoraStyle("LoRAFusion mix", ("a", "b"), None)


@pytest.mark.parametrize(
    ("setting", "loras", "mode", "why"),
    [
        # The write-up (docs/policy.md): Gemini helps 5+ references, hurts 1-3; auto follows every LoRA's plan.
        ("auto", [BIG], "reformulate", "every LoRA's training plan keeps the text pipeline"),
        ("auto", [SMALL], "raw", "StyleLoRA small turns the text pipeline off (3 references"),
        ("auto", [BIG, SMALL], "raw", "StyleLoRA small"),  # one small board is enough to turn it off
        ("auto", [FUSED], "raw", "does not say"),
        ("on", [SMALL], "reformulate", "on in the spec"),
        ("off", [BIG], "raw", "off in the spec"),
    ],
)
def test_prompt_mode_policy(setting: str, loras: list[LoraStyle], mode: str, why: str) -> None:
    decided, reason = decide_prompt_mode(setting, loras)
    assert decided == mode
    assert why in reason


@pytest.mark.parametrize(
    ("prompt", "triggers", "expected"),
    [
        ("a fox at night", ["bd9style"], "bd9style. a fox at night"),  # as the training captions start
        ("a fox at night", ["bd9style", "ink"], "bd9style, ink. a fox at night"),
        ("bd9style. a fox", ["bd9style"], "bd9style. a fox"),  # already named: not repeated
        ("a fox, in bd9style", ["bd9style", "ink"], "ink. a fox, in bd9style"),
        ("a bd9stylex fox", ["bd9style"], "bd9style. a bd9stylex fox"),  # a longer word is not the trigger
        ("  a  fox\n", [], "a fox"),
        ("a fox", ["x", "x"], "x. a fox"),
    ],
)
def test_raw_prompts_get_the_trigger_words(prompt: str, triggers: list[str], expected: str) -> None:
    assert with_triggers(prompt, triggers) == expected


def test_raw_mode_never_asks_for_a_reformulator() -> None:
    def never() -> None:
        raise AssertionError("raw mode must not build a reformulator")

    used, warnings = prompts_to_render(["a fox"], "raw", ["bd9style"], never)
    assert [(u.used, u.reformulated) for u in used] == [("bd9style. a fox", False)]
    assert warnings == []


def test_reformulated_prompts_keep_the_trigger_and_failures_fall_back_per_prompt() -> None:
    def reformulate(prompt: str) -> str:
        if "house" in prompt:
            raise ReformulationError("HTTP 503 after 3 attempts")
        return f"{prompt}, in dusty rose cashmere under low amber light"

    used, warnings = prompts_to_render(["a fox", "a red house"], "reformulate", ["bd9style"], lambda: reformulate)
    assert used[0].used == "bd9style. a fox, in dusty rose cashmere under low amber light" and used[0].reformulated
    assert (used[1].used, used[1].reformulated) == ("bd9style. a red house", False)
    assert warnings == ["prompt 2: reformulation failed (HTTP 503 after 3 attempts); the raw prompt was used"]


def test_an_empty_reformulation_is_a_failure() -> None:
    used, warnings = prompts_to_render(["a fox"], "reformulate", [], lambda: lambda p: "  ")
    assert used[0].used == "a fox" and not used[0].reformulated
    assert "came back empty" in warnings[0]


def test_unavailable_reformulation_turns_the_whole_job_raw_with_one_warning() -> None:
    def unavailable():
        raise ReformulationUnavailable("no style profile is known for these LoRAs")

    used, warnings = prompts_to_render(["a", "b"], "reformulate", ["t"], unavailable)
    assert [u.used for u in used] == ["t. a", "t. b"]
    assert len(warnings) == 1 and "no style profile" in warnings[0]


@pytest.mark.parametrize(
    ("profile", "env", "why"),
    [
        (None, {"GEMINI_API_KEY": "k"}, "no style profile"),
        ({"MUST_APPLY": {}}, {}, "no API key for gemini"),
        ({"MUST_APPLY": {}}, {"GEMINI_API_KEY": "k"}, "not a valid STYLE_PROFILE"),
    ],
)
def test_the_seam_says_why_it_cannot_reformulate(profile: dict | None, env: dict, why: str) -> None:
    work = GenerateSpec(model_path="/m", loras=(), prompts=("a",), prompt_mode="reformulate", style_profile=profile)
    with pytest.raises(ReformulationUnavailable, match=why):
        load_reformulator(work, env)


PROFILE_DOC = {
    "MUST_APPLY": {
        "COLOR": "saturated crimson and ivory, high contrast",
        "TEXTURE": "heavy silk and polished marble",
        "LIGHTING": "soft warm side light",
        "MOOD": "quiet, ceremonial",
    },
    "ENRICH": {
        "SIGNATURE_ELEMENTS": "floating rose petals",
        "WARDROBE_LANGUAGE": "draped silk",
        "ENVIRONMENT": "a marble hall",
        "CAMERA": "85mm portrait lens",
    },
    "PROMPT_SUFFIX_MUST": "crimson and ivory palette, heavy silk, soft warm side light",
    "PROMPT_SUFFIX_ENRICH": "floating rose petals",
}


def test_the_seam_reformulates_through_the_text_pipeline(gemini_server, tmp_path) -> None:
    """A generation's prompts go through the text pipeline's L2 on a local Gemini server; the answers are cached."""
    body = "A fox in draped crimson silk crosses a marble hall among floating rose petals in soft warm side light."
    answer = " ".join([body] * 7) + " " + PROFILE_DOC["PROMPT_SUFFIX_MUST"]
    gemini_server.respond = lambda request: gemini_server.answer({"prompt": answer})
    work = GenerateSpec(
        model_path="/m", loras=(), prompts=("a fox",), prompt_mode="reformulate", style_profile=PROFILE_DOC
    )
    reformulate = load_reformulator(work, gemini_server.env, cache_uri=str(tmp_path / "cache"))
    used, warnings = prompts_to_render(["a fox"], "reformulate", ["bigstyle"], lambda: reformulate)
    assert warnings == [] and used[0].reformulated
    assert used[0].used.startswith("bigstyle. A fox in draped crimson silk") and len(used[0].used.split()) > 100
    calls = len(gemini_server.requests)
    again = load_reformulator(work, gemini_server.env, cache_uri=str(tmp_path / "cache"))
    assert again("a fox") == reformulate("a fox") and len(gemini_server.requests) == calls  # from the cache


def test_a_provider_error_falls_back_to_the_raw_prompt(gemini_server) -> None:
    gemini_server.respond = lambda request: gemini_server.error(400, "API key not valid")
    work = GenerateSpec(
        model_path="/m", loras=(), prompts=("a fox",), prompt_mode="reformulate", style_profile=PROFILE_DOC
    )
    reformulate = load_reformulator(work, gemini_server.env)
    used, warnings = prompts_to_render(["a fox"], "reformulate", ["bigstyle"], lambda: reformulate)
    assert used[0].used == "bigstyle. a fox" and not used[0].reformulated
    assert "reformulation failed" in warnings[0]
