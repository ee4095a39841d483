"""The object-meta checks every real API server applies, whatever the kind, and its field validation.

They are here so the dev cluster refuses what a cluster would: a child name too long for a label (Jobs), an
upper-case name, a label value over 63 characters. Kind-specific schemas are the admission hook's business.
Field validation is the decoder's: fields a custom resource's schema does not declare, and JSON keys given twice,
which `?fieldValidation=` (Strict, Warn, Ignore) turns into an error, a warning or nothing (emulator.py).
"""

from __future__ import annotations

import json
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


# --- field validation: what the decoder finds before any schema rule ---------------------------------------------

OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)


def field_path(parts: Any) -> str:
    """("spec", "images", 3, "source") -> "spec.images[3].source"; the empty path is Go's nil path, "<nil>"."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<nil>"


def unknown_fields(obj: dict[str, Any], schema: dict[str, Any], *, drop_nulls: bool = False) -> list[str]:
    """Drop the fields of `obj` that `schema` (a CRD version's openAPIV3Schema) does not declare, in place, and
    return their paths (`spec.foo`, `metadata.foo`), as the API server's decoder prunes and reports them. The root's
    apiVersion and kind always stay and its metadata is ObjectMeta. `drop_nulls` also drops non-nullable nulls (an
    object about to be validated); a merge patch keeps them, as they delete fields."""
    unknown: list[str] = []
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        for key in [k for k in metadata if k not in OBJECT_META_FIELDS]:
            unknown.append(f"metadata.{key}")
            del metadata[key]
    _prune(obj, schema, (), unknown, drop_nulls)
    return unknown


def _prune(value: Any, node: dict[str, Any], path: tuple, unknown: list[str], drop_nulls: bool) -> None:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = node.get("properties")
        if props is None:
            extra = node.get("additionalProperties")
            for key, item in value.items() if isinstance(extra, dict) else ():
                _prune(item, extra, (*path, key), unknown, drop_nulls)
            return
        for key in list(value):
            sub = props.get(key)
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue  # every object has them, whatever the schema declares; metadata is checked above
            if sub is None:
                unknown.append(field_path((*path, key)))
                del value[key]
            elif value[key] is None and drop_nulls and not sub.get("nullable"):
                del value[key]  # a null never reaches validation: defaulting fills it or it stays absent
            else:
                _prune(value[key], sub, (*path, key), unknown, drop_nulls)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            _prune(item, node["items"], (*path, index), unknown, drop_nulls)


class _Keys(dict):
    """A JSON object that remembers the keys it was given more than once."""

    repeated: tuple[str, ...] = ()


def _keys(pairs: list[tuple[str, Any]]) -> _Keys:
    obj = _Keys(pairs)
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for key, _ in pairs:
        if key in seen:
            repeated[key] = None
        seen.add(key)
    obj.repeated = tuple(repeated)
    return obj


def duplicate_fields(body: bytes) -> list[str]:
    """Paths of the keys a JSON body gives twice in one object (`spec.seed`); the decoder keeps the last."""
    try:
        parsed = json.loads(body, object_pairs_hook=_keys)
    except ValueError:
        return []
    found: list[str] = []

    def walk(value: Any, path: tuple) -> None:
        if isinstance(value, _Keys):
            found.extend(field_path((*path, key)) for key in value.repeated)
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, index))

    walk(parsed, ())
    return found
