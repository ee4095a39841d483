"""What the installed chart tells the admin about isolation between tenants: the artifact claim's limits, and the
per-namespace object-store Secret with the prefix its credentials are limited to."""

from __future__ import annotations

from typing import Any

RELEASE, NAMESPACE = "kleinstyle", "kleinstyle-system"


def notes(chart, values: dict[str, Any]) -> str:
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    text = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    return " ".join(text.split())


def test_notes_say_what_the_subpath_mounts_do_not_isolate(chart):
    text = notes(chart, {})
    assert "Jobs mount only their own run folders of it, but a pod a tenant creates can mount it whole" in text
    assert "give each namespace a volume of its own" in text


def test_notes_ask_each_namespace_for_a_secret_with_its_prefix(chart):
    text = notes(chart, {"config": {"artifacts": {"uri": "s3://bucket/ks/", "credentialsSecret": "artifact-creds"}}})
    assert (
        'the Secret "artifact-creds": credentials limited (IAM policy) to the namespace\'s prefix, and that prefix '
        'under the key "prefix" (s3://bucket/ks/NAMESPACE/)'
    ) in text
