"""Offline admission: what a real API server does to a kleinstyle object on create, without a cluster.

Same order as kube-apiserver with these CRDs: strict decoding (unknown fields), pruning, structural defaulting,
ObjectMeta and OpenAPI schema validation, then the `x-kubernetes-validations` CEL rules (skipped, as the API server
does, when a type/required/enum/size error already makes the object unfit for them). Messages follow the API server's
field errors (`spec.training.rank: Unsupported value: 48: supported values: "16", ...`) so tests, `kleinstyle
validate` and docs show what `kubectl apply` would print.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import yaml
from cel_expr_python import cel
from cel_expr_python.ext import ext_strings
from kleinstyle.operator.api import common as api_common
from kleinstyle.operator.crdgen import build_crds

from .validation import field_path, unknown_fields

DNS1123_SUBDOMAIN = re.compile(api_common.DNS1123_SUBDOMAIN)
DNS1123_LABEL = re.compile(api_common.DNS1123_LABEL)
SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start "
    "and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end "
    "with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
BLOCKED_MESSAGE = (
    "some validation rules were not checked because the object was invalid; correct the existing errors to complete "
    "validation"
)
# Kubernetes escapes CEL keywords used as property names: `namespace` is `self.__namespace__` in a rule.
CEL_RESERVED = frozenset(
    {
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    }
)

_OMIT = object()
# code: (the API server's error type text, the StatusCause reason)
_ERROR_TYPES = {
    "required": ("Required value", "FieldValueRequired"),
    "invalid": ("Invalid value", "FieldValueInvalid"),
    "type": ("Invalid value", "FieldValueTypeInvalid"),
    "unsupported": ("Unsupported value", "FieldValueNotSupported"),
    "forbidden": ("Forbidden", "FieldValueForbidden"),
    "duplicate": ("Duplicate value", "FieldValueDuplicate"),
    "too-long": ("Too long", "FieldValueTooLong"),
    "too-many": ("Too many", "FieldValueTooMany"),
}
# Errors after which the CEL rules are not run (apiextensions-apiserver's hasBlockingErr).
_BLOCKING = frozenset({"required", "type", "unsupported", "too-long", "too-many"})


class AdmissionRejected(Exception):
    """The API server's refusal: `message` as kubectl prints it, `causes` as in the Status details, `code` its HTTP
    status (422 Invalid; 400 BadRequest for a strict-decoding error, whose Status has no causes)."""

    def __init__(self, message: str, causes: list[dict[str, str]], code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.causes = causes
        self.code = code


class CELRuleError(RuntimeError):
    """A rule that cannot be compiled or evaluated here; the API server would refuse the CRD, so never skip it."""


@dataclass(frozen=True)
class FieldError:
    """One `field.Error`: renders exactly like k8s.io/apimachinery's `Error.Error()`."""

    code: str
    field: str
    value: Any = _OMIT
    detail: str = ""

    @property
    def reason(self) -> str:
        return _ERROR_TYPES[self.code][1]

    def body(self) -> str:
        text = _ERROR_TYPES[self.code][0]
        if self.value is not _OMIT and self.code not in ("required", "forbidden", "too-long"):
            text += f": {format_value(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason, "message": self.body()}


def format_value(value: Any) -> str:
    """Go's rendering of a bad value (Kubernetes 1.37): strings quoted, numbers as %v (100, not 100.0), null bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, int | str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- YAML -------------------------------------------------------------------------------------------------------


class _KubeYAMLLoader(yaml.SafeLoader):
    """PyYAML reads `1e-4` and `1.0e5` as strings (YAML 1.1 wants `1.0e-4`); Kubernetes' YAML reads numbers."""


_KubeYAMLLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_KubeYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_manifests(text: str) -> list[dict[str, Any]]:
    """The objects in a (multi-document) YAML manifest, numbers read as kubectl reads them."""
    return [doc for doc in yaml.load_all(text, Loader=_KubeYAMLLoader) if doc is not None]


# --- CEL --------------------------------------------------------------------------------------------------------


def cel_name(name: str) -> str:
    """A property name as a CEL rule sees it (Kubernetes' escaping)."""
    if name in CEL_RESERVED:
        return f"__{name}__"
    return (
        name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__").replace("/", "__slash__")
    )


@functools.cache
def _cel_env() -> cel.Env:
    return cel.NewEnv(variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN}, extensions=[ext_strings.ExtStrings()])


@functools.cache
def _compile(expression: str) -> cel.Expression:
    try:
        return _cel_env().compile(expression)
    except RuntimeError as error:
        raise CELRuleError(f"CEL rule {expression!r} does not compile: {error}") from error


_SELF_FIELD = re.compile(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)")
_OLD_SELF = re.compile(r"\boldSelf\b")


@dataclass(frozen=True)
class _Rule:
    spec: dict[str, Any]
    program: cel.Expression
    message_program: cel.Expression | None

    @classmethod
    def compile(cls, spec: dict[str, Any], node: dict[str, Any], where: str) -> _Rule:
        """Compile once; also check what the API server's typed compiler would: `self.x` names a property."""
        props = node.get("properties")
        if props is not None and not node.get("x-kubernetes-preserve-unknown-fields"):
            known = {cel_name(name) for name in props}
            for name in _SELF_FIELD.findall(spec["rule"]):
                if name not in known:
                    raise CELRuleError(f"{where}: rule {spec['rule']!r} uses self.{name}, not a property here")
        message = spec.get("messageExpression")
        return cls(spec, _compile(spec["rule"]), _compile(message) if message else None)

    @property
    def transition(self) -> bool:
        """Rules reading oldSelf only run on update; admission here is a create."""
        return _OLD_SELF.search(self.spec["rule"]) is not None

    def check(self, value: Any, node: dict[str, Any], path: str) -> FieldError | None:
        result = self.program.eval(data={"self": value})
        kind = result.type().name()
        suffix = self.spec.get("fieldPath", "")
        # A rule on the root names its field from the root: ".spec.sources" is "spec.sources".
        target = (path + suffix) if path != "<nil>" or not suffix else suffix.lstrip(".")
        if kind == "ERROR":
            detail = str(result.plain_value())
            if "No matching overload" in detail:
                raise CELRuleError(f"{path}: rule {self.spec['rule']!r} cannot be evaluated: {detail}")
            # Kubernetes 1.37 names no value in a CEL rule's error (it wrote the value's type before).
            return FieldError("invalid", target, detail=f"{detail} evaluating rule: {self.spec['rule']}")
        if kind != "BOOL":
            raise CELRuleError(f"{path}: rule {self.spec['rule']!r} returned {kind}, not a bool")
        if result.plain_value():
            return None
        message = self.spec.get("message") or f"failed rule: {self.spec['rule']}"
        if self.message_program is not None:
            custom = self.message_program.eval(data={"self": value})
            if custom.type().name() == "STRING" and custom.plain_value().strip():
                message = custom.plain_value()
        reason = self.spec.get("reason", "FieldValueInvalid")
        if reason == "FieldValueForbidden":
            return FieldError("forbidden", target, detail=message)
        if reason == "FieldValueRequired":
            return FieldError("required", target, detail=message)
        if reason == "FieldValueDuplicate":
            return FieldError("duplicate", target, node.get("type", "object"), message)
        return FieldError("invalid", target, detail=message)


def cel_value(value: Any, node: dict[str, Any]) -> Any:
    """The value as a typed CEL binding: escaped property names, `number` fields as doubles."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        props = node.get("properties")
        if props is not None:
            return {cel_name(k): cel_value(v, props[k]) for k, v in value.items() if k in props}
        extra = node.get("additionalProperties", {})
        return {k: cel_value(v, extra) for k, v in value.items()}
    if isinstance(value, list):
        return [cel_value(item, node.get("items", {})) for item in value]
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --- one CRD, compiled ------------------------------------------------------------------------------------------


@dataclass
class Resource:
    """One served version of a CRD with its validator and compiled rules, built once and reused."""

    group: str
    version: str
    kind: str
    schema: dict[str, Any]
    validator: jsonschema.Draft4Validator = field(init=False)
    rules: dict[int, list[_Rule]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.validator = jsonschema.Draft4Validator(self.schema)
        for path, node in _nodes(self.schema, ()):
            specs = node.get("x-kubernetes-validations", ())
            if specs:
                self.rules[id(node)] = [_Rule.compile(spec, node, field_path(path)) for spec in specs]

    def prune(self, obj: dict[str, Any]) -> list[str]:
        """Drop unknown fields (returned as paths) and non-nullable nulls; the root's metadata is ObjectMeta."""
        return unknown_fields(obj, self.schema, drop_nulls=True)

    def default(self, obj: dict[str, Any]) -> None:
        _default(obj, self.schema)

    def schema_errors(self, obj: dict[str, Any]) -> list[FieldError]:
        errors: dict[str, FieldError] = {}
        for error in self.validator.iter_errors(obj):
            for item in _field_errors(error):
                errors.setdefault(str(item), item)
        return sorted(errors.values(), key=lambda e: (e.field, str(e)))

    def list_map_errors(self, obj: dict[str, Any]) -> list[FieldError]:
        """Duplicate keys in `x-kubernetes-list-type: map` lists, as the API server's structural validation finds."""
        errors: list[FieldError] = []
        _check_list_maps(obj, self.schema, (), errors)
        return errors

    def rule_errors(self, obj: dict[str, Any]) -> list[FieldError]:
        errors: list[FieldError] = []
        self._check_rules(obj, self.schema, (), errors)
        return errors

    def _check_rules(self, value: Any, node: dict[str, Any], path: tuple, errors: list[FieldError]) -> None:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return
        for rule in self.rules.get(id(node), ()):
            if not rule.transition and (error := rule.check(cel_value(value, node), node, field_path(path))):
                errors.append(error)
        if isinstance(value, dict):
            props = node.get("properties")
            for key, item in value.items():
                sub = props.get(key) if props is not None else node.get("additionalProperties")
                if isinstance(sub, dict):
                    self._check_rules(item, sub, (*path, key), errors)
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for index, item in enumerate(value):
                self._check_rules(item, node["items"], (*path, index), errors)


def _check_list_maps(value: Any, node: dict[str, Any], path: tuple, errors: list[FieldError]) -> None:
    if isinstance(value, dict):
        for name, prop in (node.get("properties") or {}).items():
            if name in value:
                _check_list_maps(value[name], prop, (*path, name), errors)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        keys = node.get("x-kubernetes-list-map-keys") if node.get("x-kubernetes-list-type") == "map" else None
        seen: set[str] = set()
        for index, item in enumerate(value):
            if keys and isinstance(item, dict):
                key = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
                if key in seen:
                    errors.append(FieldError("duplicate", field_path((*path, index)), {k: item.get(k) for k in keys}))
                seen.add(key)
            _check_list_maps(item, node["items"], (*path, index), errors)


def _nodes(node: dict[str, Any], path: tuple) -> Iterator[tuple[tuple, dict[str, Any]]]:
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _nodes(prop, (*path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _nodes(node[key], (*path, 0))


def _default(value: Any, node: dict[str, Any]) -> None:
    """Structural defaulting: set missing properties from `default`, then recurse, so defaults nest."""
    if isinstance(value, dict):
        props = node.get("properties")
        if props is None:
            extra = node.get("additionalProperties")
            for item in value.values() if isinstance(extra, dict) else ():
                _default(item, extra)
            return
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                _default(item, props[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default(item, node["items"])


_JSON_TYPES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _json_type(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "null")


def _field_errors(error: jsonschema.ValidationError) -> list[FieldError]:
    """A jsonschema error as the API server's field error(s) (kube-openapi wording)."""
    parts = list(error.absolute_path)
    path = field_path(parts)
    value, schema, keyword = error.instance, error.schema, error.validator
    bound = error.validator_value
    if keyword == "required":
        return [FieldError("required", field_path([*parts, n])) for n in bound if n not in value]
    if keyword == "type":
        return [
            FieldError(
                "type", path, _json_type(value), f'{path} in body must be of type {bound}: "{_json_type(value)}"'
            )
        ]
    if keyword == "enum":
        allowed = ", ".join(json.dumps(v if isinstance(v, str) else json.dumps(v)) for v in bound)
        return [FieldError("unsupported", path, value, f"supported values: {allowed}")]
    if keyword in ("minimum", "maximum"):
        exclusive = schema.get("exclusiveMinimum" if keyword == "minimum" else "exclusiveMaximum", False)
        relation = ("greater than" if keyword == "minimum" else "less than") + ("" if exclusive else " or equal to")
        return [FieldError("invalid", path, value, f"{path} in body should be {relation} {format_value(bound)}")]
    if keyword == "multipleOf":
        return [FieldError("invalid", path, value, f"{path} in body should be a multiple of {format_value(bound)}")]
    if keyword == "pattern":
        return [FieldError("invalid", path, value, f"{path} in body should match '{bound}'")]
    if keyword == "minLength":
        return [FieldError("invalid", path, value, f"{path} in body should be at least {bound} chars long")]
    if keyword == "maxLength":
        return [FieldError("too-long", path, value, f"may not be more than {bound} bytes")]
    if keyword == "minItems":
        return [FieldError("invalid", path, len(value), f"{path} in body should have at least {bound} items")]
    if keyword == "maxItems":
        return [FieldError("too-many", path, len(value), f"must have at most {bound} items")]
    return [FieldError("invalid", path, value, f"{path} in body {error.message}")]


# --- ObjectMeta -------------------------------------------------------------------------------------------------


def metadata_errors(metadata: Any) -> list[FieldError]:
    """What ValidateObjectMeta checks for a namespaced object on create (kubectl fills a missing namespace)."""
    if not isinstance(metadata, dict):
        return [FieldError("required", "metadata.name", detail="name or generateName is required")]
    errors = []
    name = metadata.get("name")
    if name is None or name == "":
        if not metadata.get("generateName"):
            errors.append(FieldError("required", "metadata.name", detail="name or generateName is required"))
    elif not isinstance(name, str):
        errors.append(FieldError("type", "metadata.name", _json_type(name), "must be a string"))
    elif len(name) > 253:
        errors.append(FieldError("invalid", "metadata.name", name, "must be no more than 253 characters"))
    elif not DNS1123_SUBDOMAIN.match(name):
        errors.append(FieldError("invalid", "metadata.name", name, SUBDOMAIN_MESSAGE))
    namespace = metadata.get("namespace")
    if namespace not in (None, "") and (
        not isinstance(namespace, str) or len(namespace) > 63 or not DNS1123_LABEL.match(namespace)
    ):
        errors.append(FieldError("invalid", "metadata.namespace", namespace, LABEL_MESSAGE))
    for key in ("labels", "annotations"):
        entries = metadata.get(key)
        if entries is not None and not (
            isinstance(entries, dict) and all(isinstance(v, str) for v in entries.values())
        ):
            errors.append(FieldError("type", f"metadata.{key}", entries, "must be a map of string to string"))
    return errors


# --- admission --------------------------------------------------------------------------------------------------


@functools.cache
def default_crds() -> dict[str, dict[str, Any]]:
    """The CRDs generated from the models (what `make crds` writes), built once."""
    return build_crds()


_RESOURCES: dict[int, tuple[Mapping[str, dict[str, Any]], dict[tuple[str, str], Resource]]] = {}


def _resources(crds: Mapping[str, dict[str, Any]]) -> dict[tuple[str, str], Resource]:
    """(apiVersion, kind) -> Resource for the served versions, compiled once per CRD mapping."""
    cached = _RESOURCES.get(id(crds))
    if cached is not None and cached[0] is crds:
        return cached[1]
    resources = {}
    for crd in crds.values():
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                schema = version["schema"]["openAPIV3Schema"]
                resource = Resource(spec["group"], version["name"], spec["names"]["kind"], schema)
                resources[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = resource
    while len(_RESOURCES) >= 8:  # a few CRD sets at a time (the generated ones, a test's variants)
        del _RESOURCES[next(iter(_RESOURCES))]
    _RESOURCES[id(crds)] = (crds, resources)
    return resources


def admit(
    obj: dict[str, Any], crds: Mapping[str, dict[str, Any]] | None = None, *, strict: bool = True
) -> dict[str, Any]:
    """Create `obj` as the API server would and return what it would store (pruned, defaulted, status dropped);
    raise AdmissionRejected with the API server's message otherwise. `strict=False` prunes unknown fields silently
    (`kubectl apply --validate=ignore`)."""
    if not isinstance(obj, dict):
        raise AdmissionRejected(
            "Object is not a map", [{"field": "<nil>", "reason": "BadRequest", "message": "not a map"}]
        )
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    for key, present in (("apiVersion", api_version), ("kind", kind)):
        if not present:
            raise AdmissionRejected(
                f"Object '{key[0].upper() + key[1:]}' is missing", [FieldError("required", key).cause()]
            )
    resource = _resources(default_crds() if crds is None else crds).get((api_version, kind))
    if resource is None:
        message = f'no matches for kind "{kind}" in version "{api_version}"'
        raise AdmissionRejected(message, [{"field": "kind", "reason": "NotFound", "message": message}])

    obj = copy.deepcopy(obj)
    unknown = resource.prune(obj)
    if unknown and strict:
        errors = ", ".join(f'unknown field "{path}"' for path in unknown)
        message = (
            f'{kind} in version "{resource.version}" cannot be handled as a {kind}: strict decoding error: {errors}'
        )
        raise AdmissionRejected(message, [], code=400)  # the real server's Status names the fields in its message only
    resource.default(obj)
    obj.pop("status", None)  # the status subresource is on: a create never sets status

    errors = metadata_errors(obj.get("metadata")) + resource.schema_errors(obj) + resource.list_map_errors(obj)
    if resource.rules:
        if any(error.code in _BLOCKING for error in errors):
            errors.append(FieldError("invalid", "<nil>", None, BLOCKED_MESSAGE))
        else:
            errors += resource.rule_errors(obj)
    if errors:
        name = obj.get("metadata", {}).get("name", "") if isinstance(obj.get("metadata"), dict) else ""
        rendered = list(dict.fromkeys(str(error) for error in errors))
        summary = rendered[0] if len(rendered) == 1 else f"[{', '.join(rendered)}]"
        message = f'{kind}.{resource.group} "{name}" is invalid: {summary}'
        raise AdmissionRejected(message, [error.cause() for error in errors])
    return obj
