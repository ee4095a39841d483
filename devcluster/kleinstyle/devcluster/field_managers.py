"""Server-side apply's field ownership (`metadata.managedFields`), as the API server keeps it.

Every write records which manager set which fields: an apply (`kubectl apply --server-side`, Flux, Argo CD with
server-side apply) owns exactly the fields of its configuration; any other write (create, update, patch) takes the
fields it changed. An apply that would change a field another manager owns is refused with 409 and the conflicting
fields, unless forced (then ownership moves); a field an apply set before and no longer names is removed when
no one else owns it. Lists follow the CRD schema: list maps (`x-kubernetes-list-type: map`) merge by their keys,
sets by value, other lists are atomic; built-in kinds (no schema here) treat every list as atomic.

Simplified: ownership is tracked at leaves (and list-map items), status is owned through the status subresource
only, and no `Apply` on the status subresource removes fields.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ApiError

Path = tuple[str, ...]
# (field path without list keys) -> ("map", keys) | ("set",) | ("atomic",)
ListTypes = Callable[[tuple[str, ...]], tuple[str, ...]]
IGNORED_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")


def atomic(_: tuple[str, ...]) -> tuple[str, ...]:
    return ("atomic",)


def schema_list_types(schema: Mapping[str, Any] | None) -> ListTypes:
    """List types from a CRD's openAPIV3Schema."""

    def lookup(path: tuple[str, ...]) -> tuple[str, ...]:
        node: Any = schema or {}
        for name in path:
            if node.get("type") == "array":
                node = node.get("items") or {}
            props = node.get("properties") or {}
            node = props.get(name) or node.get("additionalProperties") or {}
            if not isinstance(node, Mapping):
                return ("atomic",)
        kind = node.get("x-kubernetes-list-type", "atomic")
        if kind == "map":
            return ("map", *node.get("x-kubernetes-list-map-keys", []))
        return (kind,)

    return lookup


def _item_key(item: Any, keys: tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item.get(k) for k in keys if isinstance(item, Mapping)}, separators=(",", ":"))


def fields(obj: Any, list_types: ListTypes, at: tuple[str, ...] = (), path: Path = ()) -> set[Path]:
    """The leaf paths of `obj` ("f:name", "k:{...}" for list-map items, "v:..." for set members)."""
    out: set[Path] = set()
    if isinstance(obj, Mapping):
        if not obj and path:
            return {path}
        for key, value in obj.items():
            if not path and key in ("apiVersion", "kind", "status"):
                continue
            if path == ("f:metadata",) and key in IGNORED_META:
                continue
            out |= fields(value, list_types, (*at, key), (*path, f"f:{key}"))
        return out
    if isinstance(obj, list):
        kind = list_types(at)
        if kind[0] == "map":
            for item in obj:
                item_path = (*path, _item_key(item, kind[1:]))
                out.add((*item_path, "."))
                out |= fields(item, list_types, at, item_path)
            return out
        if kind[0] == "set":
            return {(*path, "v:" + json.dumps(v, separators=(",", ":"))) for v in obj}
    return {path} if path else out


def value_at(obj: Any, path: Path) -> Any:
    for step in path:
        if step == ".":
            return obj
        if step.startswith("f:"):
            obj = obj.get(step[2:]) if isinstance(obj, Mapping) else None
        elif step.startswith("k:"):
            wanted = json.loads(step[2:])
            obj = next((i for i in obj or [] if all(i.get(k) == v for k, v in wanted.items())), None)
        elif step.startswith("v:"):
            value = json.loads(step[2:])
            return value if value in (obj or []) else None
    return obj


def _nest(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for step in path:
            node = node.setdefault(step, {})
    return tree


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for step, sub in tree.items():
        path = (*prefix, step)
        if step == "." or not sub:
            out.add(path)
        else:
            out |= _flatten(sub, path)
    return out


def owned(entry: Mapping[str, Any]) -> set[Path]:
    return _flatten(entry.get("fieldsV1") or {})


def _entry(manager: str, operation: str, api_version: str, paths: set[Path], now: str, sub: str | None) -> dict:
    entry = {
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": _nest(paths),
    }
    if sub:
        entry["subresource"] = sub
    return entry


def _status_fields(obj: Mapping[str, Any]) -> set[Path]:
    return {("f:status", *p) for p in fields(obj.get("status") or {}, atomic)} if obj.get("status") else set()


def record_update(
    old: Mapping[str, Any] | None,
    new: dict[str, Any],
    manager: str,
    api_version: str,
    now: str,
    list_types: ListTypes,
    subresource: str | None = None,
) -> None:
    """`new`'s managedFields after a create, update or patch by `manager`: it takes the fields it changed."""
    select = _status_fields if subresource == "status" else (lambda o: fields(o, list_types))
    before = select(old) if old else set()
    after = select(new)
    changed = {p for p in after if p not in before or value_at(old, p) != value_at(new, p)}
    entries = list((old or {}).get("metadata", {}).get("managedFields") or [])
    new["metadata"]["managedFields"] = _merge(entries, manager, "Update", api_version, changed, after, now, subresource)


def _merge(
    entries: list[Mapping[str, Any]],
    manager: str,
    operation: str,
    api_version: str,
    taken: set[Path],
    exists: set[Path],
    now: str,
    subresource: str | None,
    mine: set[Path] | None = None,
) -> list[dict[str, Any]]:
    """Entries with `taken` moved to `manager` (which owns exactly `mine` when given, for an apply), paths that no
    longer exist dropped, empty entries removed."""
    out: list[dict[str, Any]] = []
    own: set[Path] = set(mine) if mine is not None else set(taken)
    for entry in entries:
        same = entry.get("manager") == manager and entry.get("operation") == operation
        if same and entry.get("subresource") == subresource:
            if mine is None:
                own |= owned(entry) & exists
            continue
        paths = (owned(entry) - taken) & exists if entry.get("subresource") == subresource else owned(entry)
        if paths:
            out.append({**entry, "fieldsV1": _nest(paths)})
    if own:
        out.append(_entry(manager, operation, api_version, own, now, subresource))
    return out


def apply(
    current: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    manager: str,
    force: bool,
    api_version: str,
    now: str,
    list_types: ListTypes,
) -> dict[str, Any]:
    """The object after `manager` applies `config` (raises 409 on conflicts unless `force`)."""
    entries = list((current or {}).get("metadata", {}).get("managedFields") or [])
    mine = fields(config, list_types)
    conflicts = sorted(
        (_manager_words(entry), path)
        for entry in entries
        if entry.get("manager") != manager and not entry.get("subresource")
        for path in owned(entry) & mine
        if current is not None and value_at(current, path) != value_at(config, path)
    )
    if conflicts and not force:
        raise _conflict_error(conflicts)
    previous = next((owned(e) for e in entries if e.get("manager") == manager and e.get("operation") == "Apply"), set())
    others = {p for e in entries if e.get("manager") != manager and not e.get("subresource") for p in owned(e)}
    result = copy.deepcopy(dict(current or {}))
    # Whole list-map items first (found by their keys while intact), then fields, deepest first.
    for path in sorted(previous - mine - others, key=lambda p: (p[-1] != ".", -len(p))):
        _remove(result, path)
    result = _merge_config(result, config, list_types, ())
    taken = {path for _, path in conflicts}  # forced: theirs no more; equal values stay shared
    exists = fields(result, list_types)
    result.setdefault("metadata", {})["managedFields"] = _merge(
        entries, manager, "Apply", api_version, taken, exists, now, None, mine
    )
    return result


def _merge_config(target: Any, config: Any, list_types: ListTypes, at: tuple[str, ...]) -> Any:
    if isinstance(config, Mapping):
        out = dict(target) if isinstance(target, Mapping) else {}
        for key, value in config.items():
            out[key] = _merge_config(out.get(key), value, list_types, (*at, key))
        return out
    if isinstance(config, list) and isinstance(target, list):
        kind = list_types(at)
        if kind[0] == "map":
            keys = kind[1:]
            merged = list(target)
            for item in config:
                index = next((i for i, old in enumerate(merged) if all(old.get(k) == item.get(k) for k in keys)), None)
                if index is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[index] = _merge_config(merged[index], item, list_types, at)
            return merged
        if kind[0] == "set":
            return [*target, *(v for v in config if v not in target)]
    return copy.deepcopy(config)


def _remove(obj: Any, path: Path) -> None:
    """Remove the field (or list-map item, or set member) at `path`, when it is there."""
    *parent_path, last = path
    if last == ".":
        *parent_path, last = parent_path
    parent = value_at(obj, tuple(parent_path)) if parent_path else obj
    if last.startswith("f:") and isinstance(parent, dict):
        parent.pop(last[2:], None)
    elif last.startswith(("k:", "v:")) and isinstance(parent, list):
        target = value_at(obj, (*parent_path, last))
        if target in parent:
            parent.remove(target)


def same_ownership(before: list[Mapping[str, Any]] | None, after: list[Mapping[str, Any]]) -> bool:
    """Whether two managedFields lists give the same fields to the same managers, whatever their times say: an
    apply that changes nothing else is then a no-op, as on a real server."""

    def untimed(entries: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        return sorted(({k: v for k, v in e.items() if k != "time"} for e in entries or ()), key=json.dumps)

    return untimed(before) == untimed(after)


def _manager_words(entry: Mapping[str, Any]) -> str:
    """A conflicting manager as the API server names it: `"alice"` for an apply, `"kopf" using v1` for an update
    (`with subresource "status"` after the name where it wrote a subresource)."""
    words = json.dumps(entry.get("manager", ""))
    if entry.get("subresource"):
        words += f" with subresource {json.dumps(entry['subresource'])}"
    if entry.get("operation") == "Update":
        words += f" using {entry.get('apiVersion')}"
    return words


def _conflict_error(conflicts: list[tuple[str, Path]]) -> ApiError:
    """409 Conflict in the API server's words: one conflict on one line; several grouped by manager."""

    def dotted(path: Path) -> str:
        return "".join(f".{s[2:]}" if s.startswith("f:") else f"[{s[2:]}]" for s in path if s != ".")

    if len(conflicts) == 1:
        (manager, path), *_ = conflicts
        message = f"Apply failed with 1 conflict: conflict with {manager}: {dotted(path)}"
    else:
        lines = []
        for manager in sorted({m for m, _ in conflicts}):
            lines += [f"conflicts with {manager}:", *(f"- {dotted(p)}" for m, p in conflicts if m == manager)]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    causes = [
        {"reason": "FieldManagerConflict", "message": f"conflict with {m}", "field": dotted(p)} for m, p in conflicts
    ]
    return ApiError(409, "Conflict", message, {"causes": causes})
