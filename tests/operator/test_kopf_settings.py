"""kopf's settings as the operator runs with them: what it keeps in annotations, and what it watches."""

from __future__ import annotations

import json

import kopf
import pytest
from kleinstyle.operator.main import configure
from kleinstyle.operator.naming import OWNER_UID


def settings() -> kopf.OperatorSettings:
    configured = kopf.OperatorSettings()
    configure(configured)
    return configured


def test_the_spec_is_not_copied_into_an_annotation() -> None:
    """A GenerationJob well within the CRD's limits (64 prompts of 700 CJK characters, escaped to six bytes each)
    would make kopf's last-handled-configuration annotation larger than the 256 KiB the API allows for all
    annotations together: the spec is left out of it, so it stays a few bytes whatever the spec holds."""
    body = kopf.Body(
        {
            "apiVersion": "kleinstyle.dev/v1alpha1",
            "kind": "GenerationJob",
            "metadata": {"name": "big", "namespace": "team-a", "labels": {"team": "a"}},
            "spec": {"loras": [{"name": "ink"}], "prompts": ["漢" * 700] * 64},
        }
    )
    assert len(json.dumps(dict(body)["spec"])) > 256 * 1024  # what the annotation held before
    essence = settings().persistence.diffbase_storage.build(body=body)
    assert "spec" not in essence and len(json.dumps(essence)) < 200


@pytest.mark.parametrize(
    ("group", "version", "plural", "selector"),
    [
        ("batch", "v1", "jobs", OWNER_UID),
        ("", "v1", "configmaps", OWNER_UID),
        ("", "v1", "serviceaccounts", OWNER_UID),
        ("rbac.authorization.k8s.io", "v1", "roles", OWNER_UID),
        ("rbac.authorization.k8s.io", "v1", "rolebindings", OWNER_UID),
        ("kueue.x-k8s.io", "v1beta2", "workloads", "kueue.x-k8s.io/job-uid"),
    ],
)
def test_children_are_watched_with_a_server_side_label_selector(group, version, plural, selector) -> None:
    """Only objects the operator labelled come to it: not every Job, ConfigMap or Role in the cluster."""
    resource = kopf.Resource(group=group, version=version, plural=plural)
    assert settings().watching.label_selectors.collect(resource) == [selector]


def test_the_kleinstyle_kinds_are_watched_whole() -> None:
    resource = kopf.Resource(group="kleinstyle.dev", version="v1alpha1", plural="generationjobs")
    assert settings().watching.label_selectors.collect(resource) == []
