"""API errors as a Kubernetes API server reports them: an HTTP code plus a `Status` document.

The same class travels both ways: the emulator raises it to answer a request, and the dev cluster's HTTP client
raises it from a server's `Status` reply, so `DevCluster.apply` surfaces the server's own message.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failed API call. `message` is the server's message, verbatim (what `kubectl` prints after `Error from`)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    @property
    def status(self) -> dict[str, Any]:
        """The `Status` document a real API server sends with this error."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status

    @classmethod
    def from_status(cls, code: int, body: Any) -> ApiError:
        if isinstance(body, dict) and body.get("kind") == "Status":
            return cls(
                int(body.get("code") or code),
                str(body.get("reason") or "Unknown"),
                str(body.get("message") or ""),
                body.get("details"),
            )
        return cls(code, "Unknown", str(body))


def _details(resource: str, group: str, name: str) -> dict[str, Any]:
    """StatusDetails as the API server fills them: `kind` is the resource (plural), `group` apart and left out when
    empty (Go's omitempty), as is an empty name."""
    details: dict[str, Any] = {"name": name} if name else {}
    if group:
        details["group"] = group
    details["kind"] = resource
    return details


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    message = f'{_qualified(resource, group)} "{name}" not found'
    return ApiError(404, "NotFound", message, _details(resource, group, name))


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    message = f'{_qualified(resource, group)} "{name}" already exists'
    return ApiError(409, "AlreadyExists", message, _details(resource, group, name))


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        _details(resource, group, name),
    )


def invalid(kind: str, group: str, name: str, message: str, causes: list[dict[str, Any]] | None = None) -> ApiError:
    """422 Invalid; `causes` ({reason, message, field}) are what kubectl lists under "is invalid:"."""
    details = _details(kind, group, name)
    if causes:
        details["causes"] = [{k: c[k] for k in ("reason", "message", "field") if k in c} for c in causes]
    return ApiError(422, "Invalid", message, details)


# The words of a field error (k8s.io/apimachinery's field.ErrorType) -> the cause's reason.
CAUSE_REASONS = {
    "Invalid value": "FieldValueInvalid",
    "Required value": "FieldValueRequired",
    "Forbidden": "FieldValueForbidden",
    "Too long": "FieldValueTooLong",
    "Too many": "FieldValueTooMany",
    "Unsupported value": "FieldValueNotSupported",
    "Duplicate value": "FieldValueDuplicate",
    "Not found": "FieldValueNotFound",
}


def field_invalid(kind: str, group: str, name: str, problems: list[str]) -> ApiError:
    """422 Invalid from field errors written as the API server prints them (`metadata.name: Invalid value: ...`):
    the message lists them (in brackets when several) and each becomes a cause naming its field."""
    causes = []
    for problem in problems:
        field, _, text = problem.partition(": ")
        reason = next((r for words, r in CAUSE_REASONS.items() if text.startswith(words)), "FieldValueInvalid")
        causes.append({"reason": reason, "message": text, "field": field})
    summary = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
    prefix = f"{kind}.{group}" if group else kind
    return invalid(kind, group, name, f'{prefix} "{name}" is invalid: {summary}', causes)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# A path no served resource answers (the API server's own wording).
NOT_FOUND_PATH = ApiError(404, "NotFound", "the server could not find the requested resource")


def too_large(limit: int) -> ApiError:
    return ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {limit}")
