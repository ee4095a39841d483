"""Request bodies in Kubernetes' protobuf encoding, read as JSON objects: kubectl sends `kubectl create secret`,
`create configmap`, `create namespace` and `create serviceaccount` as protobuf (a typed client for core kinds) and
does not retry in JSON when a server refuses it with 415.

The body is the `k8s\\x00` magic and a `runtime.Unknown` (type meta, raw bytes); the raw bytes are the object in the
Go type's generated protobuf. Only the kinds kubectl creates that way are known here, field numbers from
k8s.io/api's generated.proto (checked against kubectl's own bodies); any other kind is refused with 415 naming it.
"""

from __future__ import annotations

import base64
from typing import Any

from .errors import ApiError

MAGIC = b"k8s\x00"
# message -> field number -> (JSON name, how to read it); "msg:X" is a nested message, "rep" a repeated field.
SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {1: ("typeMeta", "msg:TypeMeta"), 2: ("raw", "bytes")},
    "TypeMeta": {1: ("apiVersion", "str"), 2: ("kind", "str")},
    "ObjectMeta": {
        1: ("name", "str"),
        2: ("generateName", "str"),
        3: ("namespace", "str"),
        11: ("labels", "map:str"),
        12: ("annotations", "map:str"),
        13: ("ownerReferences", "rep:msg:OwnerReference"),
        14: ("finalizers", "rep:str"),
    },
    "OwnerReference": {
        1: ("kind", "str"),
        3: ("name", "str"),
        4: ("uid", "str"),
        5: ("apiVersion", "str"),
        6: ("controller", "bool"),
        7: ("blockOwnerDeletion", "bool"),
    },
    "Secret": {
        1: ("metadata", "msg:ObjectMeta"),
        2: ("data", "map:base64"),
        3: ("type", "str"),
        4: ("stringData", "map:str"),
        5: ("immutable", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", "msg:ObjectMeta"),
        2: ("data", "map:str"),
        3: ("binaryData", "map:base64"),
        4: ("immutable", "bool"),
    },
    "Namespace": {1: ("metadata", "msg:ObjectMeta"), 2: ("spec", "msg:NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "rep:str")},
    "ServiceAccount": {
        1: ("metadata", "msg:ObjectMeta"),
        3: ("imagePullSecrets", "rep:msg:LocalObjectReference"),
        4: ("automountServiceAccountToken", "bool"),
    },
    "LocalObjectReference": {1: ("name", "str")},
}
# The object kinds (the messages with metadata), as opposed to the messages inside them.
KINDS = frozenset(name for name, schema in SCHEMAS.items() if any(f == "metadata" for f, _ in schema.values()))


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: varints as ints, length-delimited fields as bytes."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((number, value))
        elif wire == 2:
            length, i = _varint(data, i)
            out.append((number, data[i : i + length]))
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4  # fixed-width numbers: none of the fields read here
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _value(how: str, raw: int | bytes) -> Any:
    if how == "str":
        return bytes(raw).decode() if isinstance(raw, bytes) else raw
    if how == "bool":
        return bool(raw)
    if how == "bytes":
        return raw
    if how == "base64":
        return base64.b64encode(bytes(raw)).decode() if isinstance(raw, bytes) else raw
    if how.startswith("msg:"):
        return message(how[4:], bytes(raw) if isinstance(raw, bytes) else b"")
    raise ValueError(how)


def message(name: str, data: bytes) -> dict[str, Any]:
    """One message as a JSON object; empty strings and messages left out, as JSON encoding omits them."""
    schema = SCHEMAS[name]
    out: dict[str, Any] = {}
    for number, raw in _fields(data):
        if number not in schema:
            continue
        field, how = schema[number]
        if how.startswith("map:"):
            entry = dict(_fields(bytes(raw))) if isinstance(raw, bytes) else {}
            key = _value("str", entry.get(1, b""))
            out.setdefault(field, {})[key] = _value(how[4:], entry.get(2, b""))
        elif how.startswith("rep:"):
            out.setdefault(field, []).append(_value(how[4:], raw))
        else:
            value = _value(how, raw)
            if value not in ("", {}):
                out[field] = value
    return out


def decode(body: bytes) -> dict[str, Any]:
    """The object a protobuf request body holds, as the JSON a client would have sent; 415 for unknown kinds."""
    if not body.startswith(MAGIC):
        raise ApiError(400, "BadRequest", "a protobuf body must start with the k8s\\x00 magic")
    envelope = message("Unknown", body[len(MAGIC) :])
    type_meta = envelope.get("typeMeta") or {}
    kind = type_meta.get("kind", "")
    if kind not in KINDS:
        raise ApiError(
            415, "UnsupportedMediaType", f"the dev cluster reads protobuf bodies of {sorted(KINDS)} only, not {kind}"
        )
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind, **message(kind, envelope.get("raw", b""))}
