"""The admission catalogue against the real kube-apiserver: what tests/admission proves offline, proven for real.

Every file in tests/admission/invalid/ is sent three ways: POSTed as `kubectl apply` creates it (strict field
validation), so the Status can be read exactly as the catalogue reads the offline refusal; and through the real
kubectl, client-side and server-side. Each must be refused naming the field the file's header names. Every object in
examples/ and tests/admission/valid/ must be accepted both ways and stored with the defaults the offline admission
applies. Where the real server answers differently from the offline admission, the difference is spelled out below
(and in docs/real-cluster.md), never papered over by editing the catalogue or the CRDs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.admission import AdmissionRejected, admit, load_manifests
from kleinstyle.devcluster.controlplane import RealCluster

from .conftest import REPO

ADMISSION = REPO / "tests" / "admission"
INVALID = sorted((ADMISSION / "invalid").glob("*.yaml"))
VALID = sorted((REPO / "examples").glob("*.yaml")) + sorted((ADMISSION / "valid").glob("*.yaml"))

# Where the real kubectl refuses a case before or beside the API server's validation, in words that do not name the
# catalogue's field; the key is (case, how it is applied), the value what kubectl says instead.
KUBECTL_SAYS = {
    # kubectl needs the name to look the object up before it sends it: refused client-side, never sent.
    ("stylelora-missing-name", "client-side"): "resource name may not be empty",
    ("stylelora-missing-name", "server-side"): "resource name may not be empty",
    # Server-side apply builds a typed patch first: a list-map with a repeated key fails there, naming the list.
    ("generationjob-same-lora-twice", "server-side"): '.spec.loras: duplicate entries for key [kind="StyleLoRA"',
    ("lorafusion-same-source-twice", "server-side"): '.spec.sources: duplicate entries for key [kind="StyleLoRA"',
    ("styleboard-same-image-twice", "server-side"): ".spec.images: duplicate entries for key [source=",
}


def _header_field(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# field: "), f"{path.name}: bad header"
    return first.removeprefix("# field: ")


def _one(path: Path) -> dict[str, Any]:
    (obj,) = load_manifests(path.read_text(encoding="utf-8"))
    return obj


def _offline(obj: dict[str, Any]) -> AdmissionRejected:
    with pytest.raises(AdmissionRejected) as refused:
        admit(obj)
    return refused.value


@pytest.fixture(scope="module")
def invalid_namespace(crds_applied: RealCluster, make_namespace: Callable[..., str]) -> str:
    return make_namespace("admission-invalid")


@pytest.mark.parametrize("path", INVALID, ids=lambda path: path.stem)
def test_the_api_server_refuses_naming_the_field(
    crds_applied: RealCluster, invalid_namespace: str, resources: dict[str, dict[str, str]], path: Path
) -> None:
    field, obj = _header_field(path), _one(path)
    where = resources[obj["kind"]]
    url = f"/apis/{where['group']}/{where['version']}/namespaces/{invalid_namespace}/{where['plural']}"

    status, body = crds_applied.api("POST", url + "?fieldValidation=Strict", obj)

    assert status in (400, 422), body
    message = body["message"]
    assert field in message
    assert "evaluating rule" not in message, "a CEL rule failed to evaluate instead of deciding"
    name = obj.get("metadata", {}).get("name", "")
    assert message.startswith(
        (f'{obj["kind"]}.kleinstyle.dev "{name}" is invalid: ', f'{obj["kind"]} in version "v1alpha1" cannot be')
    )
    causes = body.get("details", {}).get("causes")
    if status == 400:  # a strict-decoding refusal: the real Status carries no causes, only the message
        assert causes is None and f'unknown field "{field}"' in message, body
    else:
        assert {cause["field"] for cause in causes} - {"<nil>"} == {field}, message

    # The offline admission (the emulator's, tests/admission's) refuses with the same words and causes.
    offline = _offline(obj)
    assert (offline.message, offline.code) == (message, status)
    if causes is not None:
        rendered = [dict(cause) for cause in offline.causes]
        assert sorted(rendered, key=json.dumps) == sorted(causes, key=json.dumps)


@pytest.mark.parametrize("mode", ["client-side", "server-side"])
@pytest.mark.parametrize("path", INVALID, ids=lambda path: path.stem)
def test_kubectl_apply_is_refused_naming_the_field(
    crds_applied: RealCluster, invalid_namespace: str, path: Path, mode: str
) -> None:
    field = _header_field(path)
    flags = ["--server-side"] if mode == "server-side" else []

    applied = crds_applied.kubectl("apply", *flags, "-n", invalid_namespace, "-f", str(path), check=False)

    assert applied.returncode != 0, applied.stdout
    expected = KUBECTL_SAYS.get((path.stem, mode), field)
    assert expected in applied.stderr


def _apply_valid(cluster: RealCluster, path: Path, namespace: str, mode: str) -> list[dict[str, Any]]:
    """Apply `path` as a user would (into `namespace` where an object names none) and read back what is stored."""
    flags = ["--server-side"] if mode == "server-side" else []
    cluster.kubectl("apply", *flags, "-n", namespace, "-f", str(path))
    stored = json.loads(cluster.kubectl("get", "-n", namespace, "-f", str(path), "-o", "json").stdout)
    return list(stored["items"]) if stored.get("kind") == "List" else [stored]


@pytest.mark.parametrize("mode", ["client-side", "server-side"])
@pytest.mark.parametrize("path", VALID, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_valid_objects_are_accepted_with_the_offline_defaults(
    crds_applied: RealCluster, make_namespace: Callable[..., str], path: Path, mode: str
) -> None:
    objects = load_manifests(path.read_text(encoding="utf-8"))
    # A file that names its namespace is applied there (kubectl refuses -n with another); the rest get their own.
    (namespace,) = {obj["metadata"].get("namespace") for obj in objects} or {None}
    namespace = make_namespace(namespace or re.sub(r"[^a-z0-9-]", "-", f"valid-{mode}-{path.stem}".lower())[:63])
    try:
        stored = _apply_valid(crds_applied, path, namespace, mode)
        assert [(o["kind"], o["metadata"]["name"]) for o in stored] == [
            (o["kind"], o["metadata"]["name"]) for o in objects
        ]
        for obj, real in zip(objects, stored, strict=True):
            assert real["spec"] == admit(obj)["spec"], f"{obj['kind']}/{obj['metadata']['name']}: defaults differ"
    finally:
        crds_applied.kubectl("delete", "-n", namespace, "-f", str(path), "--ignore-not-found", "--wait=false")
