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


def not_found(qualified: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{qualified} "{name}" not found', {"name": name, "kind": qualified})


def already_exists(qualified: str, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{qualified} "{name}" already exists', {"name": name, "kind": qualified})


def conflict(qualified: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "kind": qualified},
    )


def invalid(kind: str, group: str, name: str, message: str, causes: list[dict[str, Any]] | None = None) -> ApiError:
    """422 Invalid; `causes` ({reason, message, field}) are what kubectl lists under "is invalid:"."""
    details: dict[str, Any] = {"name": name, "group": group, "kind": kind}
    if causes:
        details["causes"] = [{k: c[k] for k in ("reason", "message", "field") if k in c} for c in causes]
    return ApiError(422, "Invalid", message, details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# A path no served resource answers (the API server's own wording).
NOT_FOUND_PATH = ApiError(404, "NotFound", "the server could not find the requested resource")


def too_large(limit: int) -> ApiError:
    return ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {limit}")
