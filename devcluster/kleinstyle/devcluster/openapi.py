"""The OpenAPI documents a real API server publishes, for the kinds the dev cluster serves.

kubectl reads them for two things: `kubectl explain` (the schema of a kind, from `/openapi/v3/apis/G/V`), and the
choice between client-side and server-side validation: it looks for a `fieldValidation` parameter on the PATCH
operation of the kind's path and, finding it, lets the server validate (`?fieldValidation=Strict`), which the dev
cluster does with the CRDs' own schemas. A custom kind's schema is its CRD's, with `apiVersion`, `kind` and
`metadata` described as a real server adds them; a built-in kind gets an open schema (the dev cluster keeps no
schemas of built-in kinds) that still names its group, version and kind.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .discovery import SERVER_VERSION
from .resources import ResourceKind

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
TYPE_FIELDS = {
    "apiVersion": {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    },
    "kind": {
        "type": "string",
        "description": "Kind is a string value representing the REST resource this object represents.",
    },
}
OBJECT_META_SCHEMA = {
    "type": "object",
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "generateName": {"type": "string", "description": "An optional prefix to generate a unique name."},
        "namespace": {"type": "string", "description": "The namespace the object is in."},
        "labels": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Map of string keys and values to organize and categorize objects.",
        },
        "annotations": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Unstructured key value map stored with a resource.",
        },
        "uid": {"type": "string", "description": "UID is the unique in time and space value for this object."},
        "resourceVersion": {"type": "string", "description": "The version of this object, for optimistic concurrency."},
        "generation": {"type": "integer", "format": "int64", "description": "A sequence number of the desired state."},
        "creationTimestamp": {"type": "string", "format": "date-time", "description": "When it was created."},
        "deletionTimestamp": {"type": "string", "format": "date-time", "description": "When it will be deleted."},
        "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before deletion."},
        "ownerReferences": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "description": "Objects this object depends on.",
        },
        "managedFields": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "description": "Which field manager owns which fields (server-side apply).",
        },
    },
}


def schema_name(kind: ResourceKind) -> str:
    """The component name a real server gives a kind: the reversed group, version, kind."""
    group = ".".join(reversed(kind.group.split("."))) if kind.group else "io.k8s.api.core"
    return f"{group}.{kind.version}.{kind.kind}"


def gv_path(kind: ResourceKind) -> str:
    return f"apis/{kind.group}/{kind.version}" if kind.group else f"api/{kind.version}"


def _gvk(kind: ResourceKind) -> dict[str, str]:
    return {"group": kind.group, "version": kind.version, "kind": kind.kind}


def _crd_schema(crds: Iterable[Mapping[str, Any]], kind: ResourceKind) -> dict[str, Any] | None:
    for crd in crds:
        spec = crd.get("spec") or {}
        if spec.get("group") != kind.group or (spec.get("names") or {}).get("plural") != kind.plural:
            continue
        for version in spec.get("versions") or []:
            if version.get("name") == kind.version:
                return copy.deepcopy(((version.get("schema") or {}).get("openAPIV3Schema")) or {"type": "object"})
    return None


def kind_schema(kind: ResourceKind, crds: Iterable[Mapping[str, Any]], ref_prefix: str) -> dict[str, Any]:
    schema = _crd_schema(crds, kind) if kind.custom else None
    if schema is None:
        schema = {
            "type": "object",
            "description": f"{kind.kind} ({kind.api_version}); the dev cluster keeps no schema of built-in kinds.",
            "x-kubernetes-preserve-unknown-fields": True,
        }
    properties = schema.setdefault("properties", {})
    properties.update(copy.deepcopy(TYPE_FIELDS))
    properties["metadata"] = {
        "description": "Standard object's metadata.",
        "allOf": [{"$ref": f"{ref_prefix}{OBJECT_META}"}],
    }
    schema["x-kubernetes-group-version-kind"] = [_gvk(kind)]
    return schema


def _operation(kind: ResourceKind, action: str, ref: str, params: list[str]) -> dict[str, Any]:
    return {
        "operationId": f"{action}{kind.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(kind),
        "parameters": [{"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}} for p in params],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}},
    }


def _paths(kind: ResourceKind, ref: str) -> dict[str, Any]:
    base = f"/{gv_path(kind)}" + ("/namespaces/{namespace}" if kind.namespaced else "") + f"/{kind.plural}"
    writes = ["fieldManager", "fieldValidation"]
    paths = {
        base: {"get": _operation(kind, "list", ref, []), "post": _operation(kind, "post", ref, writes)},
        f"{base}/{{name}}": {
            "get": _operation(kind, "get", ref, []),
            "put": _operation(kind, "put", ref, writes),
            "patch": _operation(kind, "patch", ref, [*writes, "force"]),
            "delete": _operation(kind, "delete", ref, []),
        },
    }
    if kind.has_status:
        paths[f"{base}/{{name}}/status"] = {
            "get": _operation(kind, "get", ref, []),
            "patch": _operation(kind, "patch", ref, [*writes, "force"]),
        }
    return paths


def _hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()


def v3_group_version(path: str, kinds: list[ResourceKind], crds: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The OpenAPI v3 document of one group version (`api/v1`, `apis/G/V`); None when none is served there."""
    served = [k for k in kinds if gv_path(k) == path.strip("/")]
    if not served:
        return None
    prefix = "#/components/schemas/"
    schemas: dict[str, Any] = {OBJECT_META: copy.deepcopy(OBJECT_META_SCHEMA)}
    paths: dict[str, Any] = {}
    for kind in served:
        schemas[schema_name(kind)] = kind_schema(kind, crds, prefix)
        paths.update(_paths(kind, prefix + schema_name(kind)))
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def group_versions(kinds: list[ResourceKind]) -> list[str]:
    """Every served group version as an OpenAPI v3 path (`api/v1`, `apis/G/V`)."""
    return list(dict.fromkeys(gv_path(k) for k in kinds))


def v3_root(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`/openapi/v3`: where each group version's document is, with a hash clients cache it by."""
    return {
        "paths": {path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={_hash(doc)}"} for path, doc in docs.items()}
    }


def v2(kinds: list[ResourceKind], crds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """`/openapi/v2` (Swagger 2.0): the same schemas under `definitions`."""
    prefix = "#/definitions/"
    definitions: dict[str, Any] = {OBJECT_META: copy.deepcopy(OBJECT_META_SCHEMA)}
    paths: dict[str, Any] = {}
    for kind in kinds:
        definitions[schema_name(kind)] = _without_nullable(kind_schema(kind, crds, prefix))
        for path, operations in _paths(kind, prefix + schema_name(kind)).items():
            paths[path] = {
                verb: {
                    **{k: v for k, v in op.items() if k not in ("parameters", "responses")},
                    "parameters": [{"name": p["name"], "in": "query", "type": "string"} for p in op["parameters"]],
                    "responses": {"200": {"description": "OK", "schema": {"$ref": prefix + schema_name(kind)}}},
                }
                for verb, op in operations.items()
            }
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "definitions": definitions,
    }


def _without_nullable(schema: Any) -> Any:
    """Swagger 2.0 has no `nullable`: a real server drops it from the v2 document."""
    if isinstance(schema, dict):
        return {k: _without_nullable(v) for k, v in schema.items() if k != "nullable"}
    if isinstance(schema, list):
        return [_without_nullable(v) for v in schema]
    return schema
