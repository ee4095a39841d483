"""A StyleBoard's text pipeline through the operator: the status a user sees (captions, STYLE_PROFILE, token
usage), the key and endpoint a prepare Job gets, the token metric; and end to end on the embedded cluster, with a
key (a loopback Gemini) and without one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kleinstyle.contract.reports import PrepareResult
from kleinstyle.contract.style_profile import StyleProfile
from kleinstyle.devcluster.demo import REFERENCE_CLAIM, cluster_for, with_available_provider
from kleinstyle.devcluster.references import write_references
from kleinstyle.operator import metrics
from kleinstyle.operator.api import BY_KIND
from kleinstyle.operator.api.styleboard import StyleBoardStatus
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.kinds import KIND_RUNS
from kleinstyle.operator.reconcile import Observed, reconcile, serialised

if TYPE_CHECKING:
    from tests.conftest import ModelRequest, ModelServer

NS = "team-a"
PROFILE_DOC = {
    "MUST_APPLY": {"COLOR": "ink blue on cream", "TEXTURE": "rough paper", "LIGHTING": "flat", "MOOD": "calm"},
    "ENRICH": {"SIGNATURE_ELEMENTS": "red seal", "WARDROBE_LANGUAGE": "none", "ENVIRONMENT": "hills", "CAMERA": "none"},
    "PROMPT_SUFFIX_MUST": "ink blue on cream, rough paper",
    "PROMPT_SUFFIX_ENRICH": "red seal",
}
BOARD = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleBoard",
    "metadata": {"name": "bd9", "namespace": NS, "uid": "uid-1", "generation": 1},
    "spec": {
        "triggerWord": "bd9style",
        "images": [
            {"source": f"pvc://{REFERENCE_CLAIM}/bd9/ref-0{i}.png", "caption": f"subject {i}"} for i in range(1, 5)
        ],
        "captioning": {
            "provider": "gemini",
            "apiKeySecret": {"name": "keys", "key": "gemini"},
            "givenCaptions": "fallback",
        },
    },
}


def board_run(cfg: OperatorConfig):
    kind_run = KIND_RUNS["StyleBoard"]
    spec = BY_KIND["StyleBoard"].spec.model_validate(BOARD["spec"])
    return kind_run.build(BOARD, spec, {}, cfg)


def test_the_prepare_job_gets_the_key_the_endpoint_and_the_caption_mode() -> None:
    run = board_run(OperatorConfig(textProviderURLs={"gemini": "https://gemini-proxy.internal"}))
    assert run.runspec.work.given_captions == "fallback"
    assert [(s.env, s.secret, s.key, s.optional) for s in run.secret_env] == [
        ("GEMINI_API_KEY", "keys", "gemini", True)
    ]
    assert run.extra_env == {"KLEINSTYLE_GEMINI_BASE_URL": "https://gemini-proxy.internal"}
    assert board_run(OperatorConfig()).extra_env == {}


def result(**extra: Any) -> dict[str, Any]:
    image = {"width": 512, "height": 512, "sha256": "0" * 64}
    accepted = [
        {"file": "001.png", "source": "pvc://r/1.png", "caption": "bd9style. a hill", "caption_origin": "generated",
         **image},
        {"file": "002.png", "source": "pvc://r/2.png", "caption": "bd9style. a moody boat", "caption_origin": "given",
         "caption_note": "describes style: moody", "style_words": ["moody"], **image},
    ]  # fmt: skip
    usage = {"provider": "gemini", "model": "gemini-2.5-pro", "calls": 3, "cached_calls": 1, "prompt_tokens": 900,
             "output_tokens": 60, "total_tokens": 960}  # fmt: skip
    return {
        "succeeded": True,
        "message": "prepared 2 images",
        "accepted": accepted,
        "captioning": "1 generated, 1 given by gemini (gemini-2.5-pro)",
        "style_profile": PROFILE_DOC,
        "style_profile_images": ["001.png", "002.png"],
        "token_usage": usage,
        **extra,
    }


def test_status_shows_captions_profile_and_token_usage() -> None:
    report = PrepareResult.model_validate(result())
    status = serialised(KIND_RUNS["StyleBoard"].result(report, board_run(OperatorConfig())))
    assert status["captioning"] == "1 generated, 1 given by gemini (gemini-2.5-pro)"
    assert status["captions"][1] == {
        "file": "002.png",
        "source": "pvc://r/2.png",
        "caption": "bd9style. a moody boat",
        "origin": "given",
        "note": "describes style: moody",
        "styleWords": ["moody"],
    }
    assert status["styleProfile"] == PROFILE_DOC and status["styleProfileImages"] == ["001.png", "002.png"]
    assert status["tokenUsage"] == {
        "provider": "gemini",
        "model": "gemini-2.5-pro",
        "calls": 3,
        "cachedCalls": 1,
        "promptTokens": 900,
        "outputTokens": 60,
        "totalTokens": 960,
    }
    # The status validates against the CRD's model, and the profile is one generation can read back.
    BY_KIND["StyleBoard"].status.model_validate(status)
    assert StyleProfile.model_validate(status["styleProfile"]).prompt_suffix_must == "ink blue on cream, rough paper"


def test_a_malformed_report_from_the_pod_is_a_warning_not_a_result() -> None:
    run_id = board_run(OperatorConfig()).runspec.run_id()
    body = copy.deepcopy(BOARD)
    bad = result(style_profile={"MUST_APPLY": "everything"}, token_usage="lots")
    body["status"] = {"progress": {"step": "prepare", "runHash": run_id, "state": "Succeeded", "result": bad}}
    decision = reconcile(Observed(body=body), OperatorConfig(), "2026-12-06T00:00:00Z")
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    assert warning["status"] == "True" and "report in status.progress is malformed" in warning["message"]
    assert "result.style_profile.MUST_APPLY: Input should be" in warning["message"]  # it names the field
    assert (decision.status["styleProfile"], decision.status["captions"], decision.status["tokenUsage"]) == (
        None,
        [],
        None,
    )


def test_token_usage_is_counted_once_per_run() -> None:
    sample = metrics.REGISTRY.get_sample_value
    labels = {"kind": "StyleBoard", "provider": "openrouter", "model": "m-test", "direction": "prompt"}
    before = sample("kleinstyle_text_tokens_total", labels) or 0.0
    usage = {"provider": "openrouter", "model": "m-test", "calls": 2, "cachedCalls": 0, "promptTokens": 500}
    counted = StyleBoardStatus.read({"tokenUsage": {**usage, "outputTokens": 40, "totalTokens": 540}})
    metrics.count_tokens("StyleBoard", StyleBoardStatus(), counted)
    metrics.count_tokens("StyleBoard", counted, counted)  # a later reconcile
    assert sample("kleinstyle_text_tokens_total", labels) == before + 500
    assert sample("kleinstyle_text_tokens_total", {**labels, "direction": "output"}) >= 40


def test_the_demo_switches_to_openrouter_when_only_its_key_is_set() -> None:
    docs = [copy.deepcopy(BOARD)]
    assert with_available_provider(docs, {}) == docs
    assert with_available_provider(docs, {"GEMINI_API_KEY": "k", "OPENROUTER_API_KEY": "o"}) == docs
    secret, board = with_available_provider(docs, {"OPENROUTER_API_KEY": "o"})
    assert secret["kind"] == "Secret" and secret["stringData"] == {"OPENROUTER_API_KEY": "o"}
    assert board["spec"]["captioning"]["provider"] == "openrouter"
    assert board["spec"]["captioning"]["apiKeySecret"] == {"name": "kleinstyle-openrouter", "key": "OPENROUTER_API_KEY"}


# --- end to end on the embedded cluster ---------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_references(tmp_path / "volumes" / REFERENCE_CLAIM / "bd9")
    return tmp_path


def applied_board() -> dict[str, Any]:
    board = copy.deepcopy(BOARD)
    board["metadata"] = {"name": "bd9"}
    return board


def succeeded(cluster):
    async def check():
        obj = await cluster.get("styleboards", NS, "bd9")
        status = (obj or {}).get("status") or {}
        return obj if status.get("phase") in ("Succeeded", "Failed") else None

    return check


@pytest.mark.emulator
async def test_with_a_key_the_board_is_captioned_for_real(
    root: Path, gemini_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(request: ModelRequest):
        if request.schema_name == "style_profile":
            return gemini_server.answer(PROFILE_DOC)
        return gemini_server.answer({"caption": "a round sun above two rolling hills"})

    gemini_server.respond = respond
    # The endpoint reaches the operator's config (dev_config reads it) and from there the prepare Job's env.
    monkeypatch.setenv("KLEINSTYLE_GEMINI_BASE_URL", gemini_server.base_url)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "stringData": {"gemini": "test-key"}}
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([secret, applied_board()])
        board = await cluster.wait_for(succeeded(cluster), timeout=90)
    status = board["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert [c["origin"] for c in status["captions"]] == ["generated"] * 4
    assert status["captions"][0]["caption"] == "bd9style. a round sun above two rolling hills"
    assert status["styleProfile"] == PROFILE_DOC
    assert status["tokenUsage"]["calls"] == 5 and status["tokenUsage"]["totalTokens"] == 600
    assert status["captioning"] == "4 generated by gemini (gemini-2.5-pro)"
    assert len(gemini_server.calls("caption")) == 4 and len(gemini_server.calls("style_profile")) == 1


@pytest.mark.emulator
async def test_without_a_key_the_shipped_captions_are_used_and_status_says_so(root: Path) -> None:
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([applied_board()])  # the Secret it names does not exist: the key is optional
        board = await cluster.wait_for(succeeded(cluster), timeout=90)
    status = board["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert [c["caption"] for c in status["captions"]][:2] == ["bd9style. subject 1", "bd9style. subject 2"]
    assert {c["origin"] for c in status["captions"]} == {"given"}
    assert status["captioning"] == (
        "4 given: no captioning provider (no API key for gemini: set GEMINI_API_KEY or GOOGLE_API_KEY)"
    )
    assert status.get("styleProfile") is None and status.get("tokenUsage") is None
