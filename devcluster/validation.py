"""The object-meta checks every real API server applies, whatever the kind.

They are here so the dev cluster refuses what a cluster would: a child name too long for a label (Jobs), an
upper-case name, a label value over 63 characters. Kind-specific schemas are the admission hook's business.
"""

from __future__ import annotations

import re
from typing import Any

from kleinstyle.operator.api.common import DNS1123_SUBDOMAIN

from .resources import ResourceKind

_DNS_SUBDOMAIN = re.compile(DNS1123_SUBDOMAIN)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_MAX_CONFIG_BYTES = 1024 * 1024

# Kinds whose name becomes a label value on their pods, hence at most 63 characters.
_LABELLED_BY_NAME = {("batch", "jobs"), ("batch", "cronjobs")}


def _check_qualified_name(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return "name part must consist of alphanumeric characters, '-', '_' or '.', at most 63 characters"
    return None


def object_errors(kind: ResourceKind, obj: dict[str, Any]) -> list[str]:
    """Field errors in kubectl's format (`metadata.name: Invalid value: ...`); empty when the object is fine."""
    errors: list[str] = []
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    limit = 63 if kind.storage_key in _LABELLED_BY_NAME else 253
    if len(name) > limit:
        errors.append(f'metadata.name: Invalid value: "{name}": must be no more than {limit} characters')
    elif not _DNS_SUBDOMAIN.match(name):
        errors.append(
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    for key, value in (meta.get("labels") or {}).items():
        problem = _check_qualified_name(key)
        if problem:
            errors.append(f'metadata.labels: Invalid value: "{key}": {problem}')
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(
                f'metadata.labels: Invalid value: "{value}": a valid label must be an empty string or consist of '
                "alphanumeric characters, '-', '_' or '.', at most 63 characters"
            )
    for key, value in (meta.get("annotations") or {}).items():
        problem = _check_qualified_name(key)
        if problem:
            errors.append(f'metadata.annotations: Invalid value: "{key}": {problem}')
        if not isinstance(value, str):
            errors.append(f"metadata.annotations: Invalid value: {key!r}: annotation values must be strings")
    if kind.storage_key in {("", "configmaps"), ("", "secrets")}:
        for section in ("data", "binaryData", "stringData"):
            for key in obj.get(section) or {}:
                if not _CONFIG_KEY.match(key):
                    errors.append(
                        f'{section}[{key}]: Invalid value: "{key}": a valid config key must consist of '
                        "alphanumeric characters, '-', '_' or '.'"
                    )
        size = sum(len(str(value)) for section in ("data", "binaryData") for value in (obj.get(section) or {}).values())
        if size > _MAX_CONFIG_BYTES:
            errors.append(f"data: Too long: must have at most {_MAX_CONFIG_BYTES} bytes")
    return errors
