"""The object semantics of a Kubernetes API server, which kmock's emulator leaves out.

kmock stores objects as plain dicts: no uid, resourceVersion or generation; `/status` not isolated; no selectors,
finalizer-aware deletion that never cascades; watches that replay everything. The operator's idempotency, kopf's
consistency checks and on.delete handlers all lean on the real behaviour, so this store implements it:

- `metadata.uid`, `creationTimestamp`; `resourceVersion` from one cluster-wide counter, bumped on every change
  (a write that changes nothing keeps it, as on a real server); `generation` 1 on create, +1 only when something
  outside `metadata` and `status` changes.
- Kinds with a status subresource: main-resource writes keep the stored status, `/status` writes change only status,
  status is dropped on create.
- Deletion: finalizers hold an object with `deletionTimestamp` set until they are emptied; removal cascades to
  objects whose `ownerReferences` name it (background propagation; `Orphan` strips the references instead).
- Admission: an optional `admit(obj) -> obj` hook for custom kinds on create and spec writes; an exception with a
  `message` attribute becomes HTTP 422 `Invalid`.
- A watch-event log per kind so watches resume from a resourceVersion (410 Gone when it is older than the log).

It is synchronous and guarded by one re-entrant lock: the HTTP server writes from its own thread while tests read.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import random
import string
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import builtin, errors, field_managers
from .errors import ApiError
from .patching import APPLY_PATCH, MERGE_PATCH, PatchError, apply_patch
from .resources import CRD_GROUP, CRD_PLURAL, KindRegistry, ResourceKind, builtin_kinds, kinds_from_crd
from .selectors import Requirement, fields_match, labels_match
from .validation import object_errors

Admit = Callable[[dict[str, Any]], dict[str, Any]]
StorageKey = tuple[str, str]
ObjectKey = tuple[str | None, str]

_SYSTEM_META = ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds")
_NAMESPACES: StorageKey = ("", "namespaces")
_SECRETS: StorageKey = ("", "secrets")
_JOBS: StorageKey = ("batch", "jobs")
# Built-in kinds whose objects carry metadata.generation (their strategies set it on create, as custom resources'
# does); ConfigMaps, Secrets, ServiceAccounts, RBAC objects and Events have none.
_GENERATION: frozenset[StorageKey] = frozenset(
    {
        ("", "pods"),
        ("", "podtemplates"),
        ("", "replicationcontrollers"),
        ("apps", "deployments"),
        ("apps", "replicasets"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
        ("policy", "poddisruptionbudgets"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("networking.k8s.io", "ingresses"),
        ("networking.k8s.io", "ingressclasses"),
        ("networking.k8s.io", "networkpolicies"),
        ("scheduling.k8s.io", "priorityclasses"),
        ("discovery.k8s.io", "endpointslices"),
        (CRD_GROUP, CRD_PLURAL),
    }
)
# Kinds whose DELETE answers with the deleted object; every other kind answers a Status naming what went
# (the registries' ReturnDeletedObject).
_RETURNS_DELETED: frozenset[StorageKey] = frozenset(
    {
        ("", "pods"),
        ("", "podtemplates"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("", "namespaces"),
        ("", "persistentvolumes"),
        ("", "persistentvolumeclaims"),
        ("", "resourcequotas"),
        ("storage.k8s.io", "storageclasses"),
        ("storage.k8s.io", "csidrivers"),
        ("storage.k8s.io", "csinodes"),
        ("storage.k8s.io", "volumeattachments"),
        ("storage.k8s.io", "volumeattributesclasses"),
    }
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=length))


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.setdefault("metadata", {})


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What `generation` tracks: everything except metadata, status and the type fields."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status", "apiVersion", "kind")}


def _has_generation(kind: ResourceKind) -> bool:
    return kind.custom or kind.storage_key in _GENERATION


def _unconditional_update(kind: ResourceKind) -> bool:
    """Whether a PUT without a resourceVersion is allowed: yes for built-in kinds, not for custom resources and
    CRDs (their strategies' AllowUnconditionalUpdate)."""
    return not kind.custom and kind.storage_key != (CRD_GROUP, CRD_PLURAL)


def _check_name(in_body: Any, in_url: str) -> None:
    if in_body != in_url:
        raise errors.bad_request(f"the name of the object ({in_body}) does not match the name on the URL ({in_url})")


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


def translate_event(
    event: WatchEvent,
    namespace: str | None,
    labels: list[Requirement],
    fields: list[tuple[str, str, str]],
) -> str | None:
    """The event type a filtered watch sees: an object leaving the selection is DELETED for it, entering is ADDED."""

    def selected(obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        if namespace is not None and obj.get("metadata", {}).get("namespace") != namespace:
            return False
        return labels_match(labels, obj) and fields_match(fields, obj)

    if event.type == "DELETED":
        return "DELETED" if selected(event.obj) else None
    now, before = selected(event.obj), selected(event.old)
    if now and before:
        return "MODIFIED"
    if now:
        return "ADDED"
    if before:
        return "DELETED"
    return None


class ObjectStore:
    """In-memory objects of every served kind, with the API server's metadata, deletion and admission rules."""

    def __init__(self, kinds: KindRegistry | None = None, admit: Admit | None = None, *, history: int = 20_000):
        self.kinds = kinds if kinds is not None else KindRegistry(builtin_kinds())
        self.admit = admit
        self.lock = threading.RLock()
        self._objects: dict[StorageKey, dict[ObjectKey, dict[str, Any]]] = defaultdict(dict)
        self._storage_kinds: dict[StorageKey, ResourceKind] = {kind.storage_key: kind for kind in self.kinds}
        self._uids: dict[str, tuple[StorageKey, ObjectKey]] = {}
        self._events: dict[StorageKey, list[WatchEvent]] = defaultdict(list)
        self._floor: dict[StorageKey, int] = defaultdict(int)  # events up to this rv were dropped
        self._history = history
        self._rv = 0
        self._listeners: list[Callable[[], None]] = []

    # --- reading -------------------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change (the server wakes its watches with it)."""
        self._listeners.append(listener)

    def get(self, kind: ResourceKind, namespace: str | None, name: str) -> dict[str, Any]:
        with self.lock:
            return self._present(kind, self._require(kind, namespace, name))

    def exists(self, kind: ResourceKind, namespace: str | None, name: str) -> bool:
        with self.lock:
            return (namespace if kind.namespaced else None, name) in self._objects[kind.storage_key]

    def list(
        self,
        kind: ResourceKind,
        namespace: str | None = None,
        labels: list[Requirement] | None = None,
        fields: list[tuple[str, str, str]] | None = None,
    ) -> tuple[list[dict[str, Any]], str]:
        """Matching objects sorted by namespace and name, and the resourceVersion the listing is consistent with."""
        with self.lock:
            found = []
            objects = self._objects[kind.storage_key]
            for ns, name in sorted(objects, key=lambda key: (key[0] or "", key[1])):
                obj = objects[(ns, name)]
                if namespace is not None and kind.namespaced and ns != namespace:
                    continue
                if labels_match(labels or [], obj) and fields_match(fields or [], obj):
                    found.append(self._present(kind, obj))
            return found, str(self._rv)

    def events_since(self, kind: ResourceKind, rv: int) -> list[WatchEvent]:
        """Events of this kind after `rv`; 410 Gone when the log no longer reaches back that far, or when `rv` is
        from the future (another emulator's), so the client lists again instead of missing events."""
        with self.lock:
            key = kind.storage_key
            if rv < self._floor[key]:
                raise ApiError(410, "Expired", f"too old resource version: {rv} ({self._floor[key] + 1})")
            if rv > self._rv:
                raise ApiError(410, "Expired", f"too large resource version: {rv}, current: {self._rv}")
            events = self._events[key]
            start = len(events)
            while start > 0 and events[start - 1].rv > rv:  # usually only the last few events are new
                start -= 1
            return events[start:]

    def present(self, kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
        return self._present(kind, obj)

    # --- writing -------------------------------------------------------------------------------------------------

    def create(
        self,
        kind: ResourceKind,
        namespace: str | None,
        body: dict[str, Any],
        manager: str | None = None,
        managed_fields: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Create `body`; `manager` (a field manager) owns what it set, or `managed_fields` are given (an apply)."""
        with self.lock:
            if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
                raise errors.bad_request("the body of a create must be an object with a metadata object")
            obj = copy.deepcopy(body)
            meta = _meta(obj)
            namespace = self._namespace_for(kind, namespace, meta)
            name = meta.get("name") or ""
            if not name and meta.get("generateName"):
                name = self._generate_name(kind, namespace, meta["generateName"])
            if not name:
                raise errors.field_invalid(
                    kind.kind, kind.group, "", ["metadata.name: Required value: name or generateName is required"]
                )
            if (namespace, name) in self._objects[kind.storage_key]:
                raise errors.already_exists(kind.plural, name, kind.group)
            for key in (*_SYSTEM_META, "resourceVersion", "generation", "managedFields", "selfLink"):
                meta.pop(key, None)
            if kind.has_status:
                obj.pop("status", None)
            if kind.storage_key == _NAMESPACES:
                obj["status"] = {"phase": "Active"}
            meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
            if _has_generation(kind):
                meta["generation"] = 1
            if namespace is not None:
                meta["namespace"] = namespace
            system = {key: meta[key] for key in _SYSTEM_META if key in meta} | {"generation": 1}
            obj = self._normalise(kind, obj)
            if kind.custom:
                obj = self._admitted(kind, obj, system, status=None)
            self._validate(kind, obj)
            if managed_fields is not None:
                obj["metadata"]["managedFields"] = managed_fields
            elif manager:
                field_managers.record_update(
                    None, obj, manager, kind.api_version, now_rfc3339(), self._list_types(kind)
                )
            if kind.group == CRD_GROUP and kind.plural == CRD_PLURAL:
                self._register_crd(obj)
            if namespace is not None:
                self._ensure_namespace(namespace)
            return self._store(kind, obj, None, "ADDED")

    def replace(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        body: dict[str, Any],
        subresource: str | None = None,
        manager: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            if not isinstance(body, dict):
                raise errors.bad_request("the body of an update must be an object")
            meta = body.get("metadata") or {}
            _check_name(meta.get("name", name), name)
            current = self._require(kind, namespace, name)
            if not meta.get("resourceVersion") and not _unconditional_update(kind):
                message = "metadata.resourceVersion: Invalid value: 0: must be specified for an update"
                raise errors.field_invalid(kind.plural, kind.group, name, [message])
            self._check_version(kind, current, meta.get("resourceVersion"))
            return self._write(kind, current, copy.deepcopy(body), subresource, manager)

    def patch(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
        manager: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Patch per `content_type`; a server-side apply (apply-patch+yaml) creates the object when it is missing."""
        with self.lock:
            is_apply = (content_type or "").split(";")[0].strip().lower() == APPLY_PATCH and subresource is None
            if is_apply:
                return self._server_side_apply(kind, namespace, name, patch, manager, force)
            current = self._require(kind, namespace, name)
            if isinstance(patch, dict):
                self._check_version(kind, current, (patch.get("metadata") or {}).get("resourceVersion"))
            try:
                merged = apply_patch(current, patch, content_type)
            except PatchError as exc:  # the real server names nothing here (details empty); this says why
                raise ApiError(422, "Invalid", f"the patch does not apply: {exc}") from exc
            _check_name((merged.get("metadata") or {}).get("name", name), name)
            return self._write(kind, current, merged, subresource, manager)

    def _server_side_apply(
        self, kind: ResourceKind, namespace: str | None, name: str, config: Any, manager: str | None, force: bool
    ) -> dict[str, Any]:
        if not manager:
            required = "fieldManager: Required value: is required for apply patch"
            raise errors.field_invalid("PatchOptions", "meta.k8s.io", "", [required])
        if not isinstance(config, dict):
            raise errors.bad_request("an apply patch must be an object")
        _check_name((config.get("metadata") or {}).get("name", name), name)
        current = self._objects[kind.storage_key].get((namespace if kind.namespaced else None, name))
        applied = field_managers.apply(
            current, config, manager, force, kind.api_version, now_rfc3339(), self._list_types(kind)
        )
        managed = applied["metadata"]["managedFields"]
        if current is None:
            body = copy.deepcopy(config)
            _meta(body)["name"] = name
            return self.create(kind, namespace, body, managed_fields=managed)
        return self._write(kind, current, applied, None, managed=managed)

    def delete(
        self, kind: ResourceKind, namespace: str | None, name: str, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self.lock:
            current = self._require(kind, namespace, name)
            options = options or {}
            preconditions = options.get("preconditions") or {}
            meta = current["metadata"]
            if preconditions.get("uid") not in (None, meta["uid"]):
                raise errors.conflict(kind.plural, name, kind.group)
            self._check_version(kind, current, preconditions.get("resourceVersion"))
            result = self._delete(kind, current, self._propagation(kind, options))
            if self._key(current) in self._objects[kind.storage_key] or kind.storage_key in _RETURNS_DELETED:
                return result  # held by finalizers: the object with its deletionTimestamp
            details = {"name": name, "group": kind.group, "kind": kind.plural, "uid": meta["uid"]}
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
            return status | {"details": {key: value for key, value in details.items() if value}}

    def delete_collection(
        self,
        kind: ResourceKind,
        namespace: str | None,
        labels: list[Requirement] | None = None,
        fields: list[tuple[str, str, str]] | None = None,
        options: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        with self.lock:
            policy = self._propagation(kind, options or {})
            deleted = []
            for item in self.list(kind, namespace, labels, fields)[0]:
                current = self._objects[kind.storage_key].get(self._key(item))
                if current is not None:
                    deleted.append(self._delete(kind, current, policy))
            return deleted

    # --- internals -----------------------------------------------------------------------------------------------

    def _present(self, kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
        if kind.storage_key != (kind.group, kind.plural):
            return builtin.event_v1(obj, kind.api_version)
        # Stored dicts are never mutated in place, so a shallow copy is a safe snapshot.
        body = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind")}
        return {"apiVersion": kind.api_version, "kind": kind.kind, **body}

    def _list_types(self, kind: ResourceKind) -> field_managers.ListTypes:
        """How the kind's lists merge under server-side apply: from its CRD's schema; built-in kinds: atomic."""
        if not kind.custom:
            return field_managers.atomic
        crd = self._objects[(CRD_GROUP, CRD_PLURAL)].get((None, kind.qualified)) or {}
        for version in (crd.get("spec") or {}).get("versions") or []:
            if version.get("name") == kind.version:
                return field_managers.schema_list_types((version.get("schema") or {}).get("openAPIV3Schema"))
        return field_managers.atomic

    @staticmethod
    def _key(obj: dict[str, Any]) -> ObjectKey:
        meta = obj["metadata"]
        return meta.get("namespace"), meta["name"]

    def _require(self, kind: ResourceKind, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[kind.storage_key].get((namespace if kind.namespaced else None, name))
        if obj is None:
            raise errors.not_found(kind.plural, name, kind.group)
        return obj

    def _namespace_for(self, kind: ResourceKind, namespace: str | None, meta: dict[str, Any]) -> str | None:
        if not kind.namespaced:
            meta.pop("namespace", None)
            return None
        in_body = meta.get("namespace")
        if namespace and in_body and in_body != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        resolved = namespace or in_body
        if not resolved:
            raise errors.bad_request(f"a namespace is required to create {kind.qualified}")
        return resolved

    def _generate_name(self, kind: ResourceKind, namespace: str | None, prefix: str) -> str:
        while True:
            name = f"{prefix[:58]}{random_suffix()}"
            if (namespace, name) not in self._objects[kind.storage_key]:
                return name

    def _check_version(self, kind: ResourceKind, current: dict[str, Any], expected: str | None) -> None:
        if expected not in (None, "") and str(expected) != current["metadata"]["resourceVersion"]:
            raise errors.conflict(kind.plural, current["metadata"]["name"], kind.group)

    @staticmethod
    def _propagation(kind: ResourceKind, options: dict[str, Any]) -> str:
        """The DeleteOptions' policy; none given: what the kind's registry defaults to (batch/v1 Jobs orphan their
        pods, for compatibility, as on a real server; everything else goes in the background)."""
        policy = options.get("propagationPolicy")
        if not policy and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if not policy:
            policy = "Orphan" if kind.storage_key == _JOBS and kind.version == "v1" else "Background"
        if policy not in ("Background", "Foreground", "Orphan"):
            raise errors.bad_request(f"unknown propagationPolicy {policy!r}")
        return policy

    def _normalise(self, kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
        if kind.storage_key != (kind.group, kind.plural):
            obj = builtin.event_core(obj)
        if kind.storage_key == _JOBS and "uid" in _meta(obj) and "selector" not in (obj.get("spec") or {}):
            obj = builtin.default_job(obj)
        if kind.storage_key == _SECRETS and obj.get("stringData"):
            data = dict(obj.get("data") or {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        return obj

    def _admitted(
        self, kind: ResourceKind, obj: dict[str, Any], system: dict[str, Any], status: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Run the admission hook; keep the fields it may not change (system metadata, and status on spec writes)."""
        if self.admit is None:
            return obj
        try:
            result = self.admit(copy.deepcopy(obj))
        except Exception as exc:
            message = getattr(exc, "message", None)
            if message is None:
                raise
            causes = getattr(exc, "causes", None)
            raise errors.invalid(kind.kind, kind.group, system.get("name", ""), str(message), causes) from exc
        admitted = copy.deepcopy(result) if result is not None else obj
        meta = _meta(admitted)
        for key in (*_SYSTEM_META, "generation"):
            meta.pop(key, None)
        meta.update(system)
        admitted["apiVersion"], admitted["kind"] = obj.get("apiVersion"), obj.get("kind")
        if kind.has_status:
            admitted.pop("status", None)
            if status is not None:
                admitted["status"] = status
        return admitted

    def _validate(self, kind: ResourceKind, obj: dict[str, Any]) -> None:
        problems = object_errors(kind, obj)
        if problems:
            raise errors.field_invalid(kind.kind, kind.group, obj["metadata"].get("name", ""), problems)

    def _write(
        self,
        kind: ResourceKind,
        current: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        manager: str | None = None,
        managed: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Finish an update (replace or patch): isolate status, keep system fields, admit, bump generation."""
        if subresource not in (None, "status") or (subresource == "status" and not kind.has_status):
            raise errors.not_found(kind.plural, current["metadata"]["name"], kind.group)
        if subresource == "status":
            updated = copy.deepcopy(current)
            if new.get("status") is None:
                updated.pop("status", None)
            else:
                updated["status"] = new["status"]
            new = updated
        elif kind.has_status:
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        old_meta = current["metadata"]
        meta = _meta(new)
        for key in _SYSTEM_META:
            meta.pop(key, None)
            if key in old_meta:
                meta[key] = old_meta[key]
        meta.pop("generation", None)
        if "generation" in old_meta:
            meta["generation"] = old_meta["generation"]
        meta["resourceVersion"] = old_meta["resourceVersion"]
        meta.pop("managedFields", None)  # the server keeps them: from the apply, or recorded below
        if "managedFields" in old_meta:
            meta["managedFields"] = old_meta["managedFields"]
        new["apiVersion"], new["kind"] = current.get("apiVersion"), current.get("kind")
        new = self._normalise(kind, new)
        if kind.custom and subresource is None:
            system = {key: meta[key] for key in _SYSTEM_META if key in meta}
            system |= {"generation": meta["generation"], "resourceVersion": meta["resourceVersion"]}
            new = self._admitted(kind, new, system, current.get("status"))
            meta = new["metadata"]
        if "generation" in old_meta and _content(new) != _content(current):
            meta["generation"] = old_meta["generation"] + 1
        if old_meta.get("deletionTimestamp"):
            old_finalizers = set(old_meta.get("finalizers") or ())
            added = [f for f in meta.get("finalizers") or () if f not in old_finalizers]
            if added:
                found = "[]string{" + ", ".join(json.dumps(f) for f in added) + "}"
                problem = (
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {found}"
                )
                raise errors.field_invalid(kind.kind, kind.group, meta["name"], [problem])
        self._validate(kind, new)
        if managed is not None and not field_managers.same_ownership(old_meta.get("managedFields"), managed):
            meta["managedFields"] = managed  # an apply that changes only who owns what (a shared field) is a write
        if new == current:
            return self._present(kind, current)  # a no-op write: no new resourceVersion, no watch event
        if managed is not None:
            meta["managedFields"] = managed
        elif manager:
            field_managers.record_update(
                current, new, manager, kind.api_version, now_rfc3339(), self._list_types(kind), subresource
            )
        if kind.group == CRD_GROUP and kind.plural == CRD_PLURAL:
            self._register_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(kind, new, "Background")
        return self._store(kind, new, current, "MODIFIED")

    def _delete(self, kind: ResourceKind, current: dict[str, Any], policy: str) -> dict[str, Any]:
        meta = current["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return self._present(kind, current)
            marked = copy.deepcopy(current)
            marked["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
            if "generation" in meta:  # as a real server: setting deletionTimestamp moves the generation
                marked["metadata"]["generation"] = meta["generation"] + 1
            return self._store(kind, marked, current, "MODIFIED")
        return self._remove(kind, current, policy)

    def _store(self, kind: ResourceKind, new: dict[str, Any], old: dict[str, Any] | None, event: str) -> dict[str, Any]:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = self._key(new)
        self._objects[kind.storage_key][key] = new
        self._storage_kinds.setdefault(kind.storage_key, kind)
        self._uids[new["metadata"]["uid"]] = (kind.storage_key, key)
        self._log(kind.storage_key, WatchEvent(self._rv, event, new, old))
        self._notify()
        return self._present(kind, new)

    def _remove(self, kind: ResourceKind, obj: dict[str, Any], policy: str) -> dict[str, Any]:
        key = self._key(obj)
        self._objects[kind.storage_key].pop(key, None)
        uid = obj["metadata"]["uid"]
        self._uids.pop(uid, None)
        self._rv += 1
        gone = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
        self._log(kind.storage_key, WatchEvent(self._rv, "DELETED", gone, obj))
        if kind.storage_key == _NAMESPACES:
            self._delete_namespace_contents(obj["metadata"]["name"])
        if kind.group == CRD_GROUP and kind.plural == CRD_PLURAL:
            self._unregister_crd(obj)
        self._collect_garbage(uid, policy)
        self._notify()
        return self._present(kind, gone)

    def _collect_garbage(self, owner_uid: str, policy: str) -> None:
        """Delete (or orphan) the dependents of a removed owner, as the garbage collector would."""
        for storage_key, objects in list(self._objects.items()):
            dependent_kind = self._storage_kinds.get(storage_key)
            if dependent_kind is None:
                continue
            for obj in list(objects.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                if self._objects[storage_key].get(self._key(obj)) is not obj:
                    continue  # already removed by an earlier cascade
                if policy == "Orphan":
                    orphaned = copy.deepcopy(obj)
                    kept = [ref for ref in refs if ref.get("uid") != owner_uid]
                    orphaned["metadata"]["ownerReferences"] = kept
                    if not kept:  # an empty list is no list, as the server serialises it
                        del orphaned["metadata"]["ownerReferences"]
                    self._store(dependent_kind, orphaned, obj, "MODIFIED")
                elif not any(ref.get("uid") in self._uids for ref in refs):
                    self._delete(dependent_kind, obj, "Background")

    def _delete_namespace_contents(self, namespace: str) -> None:
        for storage_key, objects in list(self._objects.items()):
            kind = self._storage_kinds.get(storage_key)
            if kind is None or not kind.namespaced:
                continue
            for (ns, _), obj in list(objects.items()):
                if ns == namespace and self._objects[storage_key].get((ns, obj["metadata"]["name"])) is obj:
                    self._delete(kind, obj, "Background")

    def _ensure_namespace(self, namespace: str) -> None:
        """Namespaces spring into existence on first use: the dev cluster has no admin to create them."""
        kind = self._storage_kinds.get(_NAMESPACES)
        if kind is None or (None, namespace) in self._objects[_NAMESPACES]:
            return
        self.create(kind, None, {"metadata": {"name": namespace}})

    def _register_crd(self, crd: dict[str, Any]) -> None:
        try:
            kinds = kinds_from_crd(crd)
        except (ValueError, KeyError, TypeError) as exc:
            name = crd.get("metadata", {}).get("name", "")
            raise errors.invalid("CustomResourceDefinition", CRD_GROUP, name, str(exc)) from exc
        for kind in kinds:
            if kind.storage_key not in self._storage_kinds:
                # A new kind's watch history starts with its CRD, as a real server's watch cache for it does: a
                # watch from an older resourceVersion is 410 Gone there too.
                self._floor[kind.storage_key] = self._rv + 1
            self.kinds.add(kind)
            self._storage_kinds[kind.storage_key] = kind

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        kinds = kinds_from_crd(crd)
        for kind in kinds:
            self.kinds.remove(kind)
        storage_key = kinds[0].storage_key
        for obj in list(self._objects[storage_key].values()):
            self._remove(kinds[0], obj, "Background")
        self._storage_kinds.pop(storage_key, None)

    def _log(self, key: StorageKey, event: WatchEvent) -> None:
        events = self._events[key]
        events.append(event)
        if len(events) > 2 * self._history:
            dropped = len(events) - self._history
            self._floor[key] = events[dropped - 1].rv
            del events[:dropped]

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
