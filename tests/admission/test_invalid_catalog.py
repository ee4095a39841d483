"""Every file in invalid/ is refused offline exactly as the API server would, naming the field its header names.

Each file starts with `# field: PATH` (the one field the refusal must name) and `# rule: ...` (what it breaks), so
the catalog doubles as documentation of what `kubectl apply` refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.devcluster.admission import AdmissionRejected, admit, load_manifests

INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))

# The cases the catalog must always keep (one per rule the design promises to refuse at apply time).
REQUIRED = {
    "stylelora-rank-48",
    "stylelora-steps-below-100",
    "stylelora-steps-above-10000",
    "stylelora-learning-rate-zero",
    "stylelora-learning-rate-negative",
    "stylelora-caption-dropout-negative",
    "stylelora-caption-dropout-above-1",
    "styleboard-zero-images",
    "styleboard-51-images",
    "styleboard-http-source",
    "styleboard-ftp-source",
    "styleboard-relative-path-source",
    "styleboard-file-uri-source",
    "generationjob-width-not-multiple-of-16",
    "generationjob-width-above-2048",
    "generationjob-height-below-256",
    "generationjob-zero-steps",
    "lorafusion-one-source",
    "stylelora-unknown-variant",
    "lorafusion-unknown-method",
    "stylelora-board-namespace",
    "generationjob-lora-namespace",
    "lorafusion-rank-and-energy",
    "lorafusion-concat-with-rank",
    "stylelora-custom-blocks-missing",
    "stylelora-blocks-without-custom",
    "stylelora-bad-block-name",
    "stylelora-typo-in-spec",
    "styleboard-missing-trigger-word",
    "styleboard-bad-trigger-word",
    "generationjob-empty-prompt",
    "generationjob-65-prompts",
    "generationjob-weight-3",
    "styleboard-unknown-captioning-provider",
    "stylelora-missing-spec",
    "stylelora-bad-name",
}


def _header(path: Path) -> tuple[str, str]:
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first.startswith("# field: ") and second.startswith("# rule: "), f"{path.name}: bad header"
    return first.removeprefix("# field: "), second.removeprefix("# rule: ")


def test_catalog_covers_the_promised_rules() -> None:
    assert len(INVALID) >= 35
    assert {path.stem for path in INVALID} >= REQUIRED, REQUIRED - {path.stem for path in INVALID}


@pytest.mark.parametrize("path", INVALID, ids=lambda path: path.stem)
def test_refused_naming_the_field(path: Path) -> None:
    field, _rule = _header(path)
    (obj,) = load_manifests(path.read_text(encoding="utf-8"))

    with pytest.raises(AdmissionRejected) as refused:
        admit(obj)

    error = refused.value
    assert field in error.message
    # The file breaks exactly its one rule; "<nil>" is the API server's note that CEL rules were skipped. A strict-
    # decoding refusal (400) names its field in the message only, as the real server's does.
    if error.code == 400:
        assert error.causes == [] and f'unknown field "{field}"' in error.message
    else:
        assert {cause["field"] for cause in error.causes} - {"<nil>"} == {field}, error.message
    assert "evaluating rule" not in error.message, "a CEL rule failed to evaluate instead of deciding"
    name = obj.get("metadata", {}).get("name", "")
    assert error.message.startswith(
        (f'{obj["kind"]}.kleinstyle.dev "{name}" is invalid: ', f'{obj["kind"]} in version "v1alpha1" cannot be')
    )
