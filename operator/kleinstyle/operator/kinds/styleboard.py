"""StyleBoard: reference images -> a `prepare` run (CPU) -> a captioned dataset, with a STYLE_PROFILE.

YAML -> `build` (PrepareSpec: images as the pod reads them, captioning, the admin's fetch limits; keys from Secrets)
-> Job `kleinstyle prepare` (runtime.prepare) -> `PrepareResult` -> `result` (counts, rejections, captions, the
profile, token usage; the dataset's URI from the RunSpec).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kleinstyle.contract.layout import DATASET_DIR
from kleinstyle.contract.pod import PROVIDER_KEY_ENV, REFERENCES_MOUNT, SOURCE_CREDENTIAL_ENV
from kleinstyle.contract.reports import PrepareResult
from kleinstyle.contract.runspec import FetchPolicy, ImageInput, PrepareSpec

from ..api import BY_KIND
from ..api.styleboard import (
    DuplicateImage,
    ImageCaption,
    RejectedImage,
    StyleBoardOutcome,
    StyleBoardSpec,
    StyleBoardStatus,
    TokenUsageStatus,
)
from ..children import InvalidSpec, Run, SecretEnv
from ..config import OperatorConfig
from .base import Dependencies, KindRuns, build_run, with_provider_url


def image_input(source: str, caption: str | None, field: str, cfg: OperatorConfig) -> tuple[ImageInput, str | None]:
    """pvc://CLAIM/PATH becomes the path where the prepare pod mounts that claim (and the claim to mount). The
    operator's own claims are refused (InvalidSpec naming `field`): with one filesystem behind every namespace's
    claim, the artifact claim holds every tenant's runs."""
    if source.startswith("pvc://"):
        claim, _, path = source[len("pvc://") :].partition("/")
        own = {cfg.artifacts.claim_name: "the artifacts", cfg.model_cache_claim: "the model cache"}
        if claim in own:
            raise InvalidSpec(
                f"{field}: {source} names the claim {claim}, which holds {own[claim]} of kleinstyle; a pvc:// source "
                "must name a claim of your own"
            )
        return ImageInput(source=f"{REFERENCES_MOUNT}/{claim}/{path}", caption=caption, label=source), claim
    return ImageInput(source=source, caption=caption), None


class StyleBoardRuns(KindRuns[StyleBoardSpec, PrepareSpec, None, PrepareResult, StyleBoardStatus]):
    kind = BY_KIND["StyleBoard"]
    step = "prepare"
    outcome = StyleBoardOutcome
    status_type = StyleBoardStatus
    work_type = PrepareSpec

    def build(self, body: Mapping[str, Any], spec: StyleBoardSpec, deps: Dependencies, cfg: OperatorConfig) -> Run:
        images, claims = [], []
        for i, image in enumerate(spec.images):
            item, claim = image_input(image.source, image.caption, f"spec.images[{i}].source", cfg)
            images.append(item)
            if claim and claim not in claims:
                claims.append(claim)
        work = PrepareSpec(
            trigger_word=spec.trigger_word,
            images=tuple(images),
            captioning_provider=spec.captioning.provider,
            captioning_model=spec.captioning.model,
            given_captions=spec.captioning.given_captions,
            fetch=FetchPolicy(
                allowed_cidrs=tuple(cfg.fetch_allowed_cidrs),
                max_bytes=cfg.fetch_max_bytes,
                max_pixels=cfg.fetch_max_pixels,
            ),
        )
        secrets: list[SecretEnv] = []
        key = spec.captioning.api_key_secret
        if key and spec.captioning.provider in PROVIDER_KEY_ENV:
            # Optional: without the key, prepare uses the given captions and says so in a warning.
            secrets.append(SecretEnv(PROVIDER_KEY_ENV[spec.captioning.provider], key.name, key.key, optional=True))
        if spec.storage_secret:
            secrets += [
                SecretEnv(env, spec.storage_secret, key, optional=True) for key, env in SOURCE_CREDENTIAL_ENV.items()
            ]
        run = build_run(self.kind, body, work, cfg, None, secrets, claims)
        return with_provider_url(run, spec.captioning.provider, cfg)

    def result(self, result: PrepareResult, run: Run) -> StyleBoardStatus:
        usage = result.token_usage
        profile = result.style_profile
        return StyleBoardStatus(
            images_accepted=len(result.accepted),
            images_rejected=len(result.rejected),
            rejected=[RejectedImage(source=r.source, reason=r.reason) for r in result.rejected],
            duplicates=[
                DuplicateImage(source=d.source, similar_to=d.resembles, distance=d.distance) for d in result.duplicates
            ],
            dataset_uri=f"{run.runspec.output_display_uri}/{DATASET_DIR}" if result.accepted else None,
            captioning=result.captioning or None,
            captions=[
                ImageCaption(
                    file=a.file,
                    source=a.source,
                    caption=a.caption,
                    origin=a.caption_origin,
                    note=a.caption_note or None,
                    style_words=a.style_words,
                )
                for a in result.accepted
            ],
            style_profile=profile,
            style_profile_images=result.style_profile_images if profile else [],
            token_usage=TokenUsageStatus.model_validate(usage.model_dump(include=set(TokenUsageStatus.model_fields)))
            if usage
            else None,
        )
