"""Report a run's progress to the resource that owns it, and leave a termination message for Kubernetes.

Progress travels as a JSON merge patch on the owner's status subresource, `{"status": {"progress": {...}}}`: the
Job's ServiceAccount may patch only that (docs/runspec.md); the operator owns every other status field. What goes
in it is the contract's typed report (`kleinstyle.contract.reports`), built by the step harness (step.py).
Where the API is:
- `KLEINSTYLE_KUBE_API`, a plain http base URL without auth (the local dev cluster sets it);
- else in-cluster: `KUBERNETES_SERVICE_HOST`/`_PORT`, with the ServiceAccount token and CA;
- else nowhere (a one-machine CLI run): reporting is a logged no-op.
A report that fails is logged and dropped after a few tries: losing a progress line must never fail a run whose
artifacts are fine, and the operator also reads the Job's outcome and termination message.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from kleinstyle.contract.pod import KUBE_API_ENV, TERMINATION_LOG
from kleinstyle.contract.runspec import Owner

from .paths import local_path

log = logging.getLogger(__name__)

API_ENV = KUBE_API_ENV
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes; the kubelet truncates anything longer
_RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ApiTarget:
    """Where and how to reach the Kubernetes API."""

    base_url: str
    token: str | None = None
    verify: ssl.SSLContext | bool = True


def api_target(env: Mapping[str, str] | None = None) -> ApiTarget | None:
    """The API this process should report to, or None when it runs outside any cluster.

    Read on every report: ServiceAccount tokens are rotated by the kubelet while a long run goes on.
    """
    env = os.environ if env is None else env
    if base := env.get(API_ENV, "").strip():
        return ApiTarget(base.rstrip("/"))
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    if not host:
        return None
    port = env.get("KUBERNETES_SERVICE_PORT", "443").strip()
    token_path = local_path(f"{SERVICE_ACCOUNT_DIR}/token")
    ca_path = local_path(f"{SERVICE_ACCOUNT_DIR}/ca.crt")
    try:
        token = token_path.read_text().strip()
    except OSError as exc:
        log.warning("no ServiceAccount token at %s (%s); reporting without one", token_path, exc)
        token = None
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_path)) if ca_path.is_file() else True
    bracketed = f"[{host}]" if ":" in host else host
    return ApiTarget(f"https://{bracketed}:{port}", token, verify)


def status_path(owner: Owner) -> str:
    """The owner's status subresource, e.g. /apis/kleinstyle.dev/v1alpha1/namespaces/ns/styleboards/b/status."""
    return f"/apis/{owner.api_version}/namespaces/{owner.namespace}/{owner.plural}/{owner.name}/status"


def progress_patch(progress: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch for `progress`; keys set to None are removed from the status (merge-patch semantics).
    Non-finite numbers (a NaN loss or score) become None: JSON has no NaN, and one must not stop every report."""
    return {"status": {"progress": _finite(dict(progress))}}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def report_progress(
    owner: Owner,
    progress: Mapping[str, Any],
    *,
    target: ApiTarget | None = None,
    attempts: int = 3,
    backoff_s: float = 0.5,
    timeout_s: float = 10.0,
) -> bool:
    """Patch `status.progress` of `owner`; True when the API took it. Never raises for API or network trouble.

    `target` defaults to `api_target()` from the environment. Retries transport errors, 409, 429 and 5xx with
    doubling backoff; other answers (403: RBAC, 404: the resource is gone) cannot improve by retrying.
    """
    target = target or api_target()
    if target is None:
        log.info("no Kubernetes API configured; progress not reported: %s", dict(progress))
        return False
    url = target.base_url + status_path(owner)
    headers = {"Content-Type": MERGE_PATCH}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    body = progress_patch(progress)
    with httpx.Client(verify=target.verify, timeout=timeout_s, trust_env=False) as client:
        for attempt in range(1, attempts + 1):
            try:
                response = client.patch(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                problem, retry = f"{type(exc).__name__}: {exc}", True
            else:
                if response.is_success:
                    return True
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                retry = response.status_code in _RETRY_STATUSES
            log.warning("progress report to %s failed (attempt %d of %d): %s", url, attempt, attempts, problem)
            if not retry or attempt == attempts:
                return False
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return False


def write_termination_message(text: str) -> bool:
    """Leave `text` (at most 4096 bytes, cut at a character boundary) where the kubelet reads it.

    Skipped when the termination log's folder does not exist (a CLI run on a laptop). Never raises.
    """
    path = local_path(TERMINATION_LOG)
    if not path.parent.is_dir():
        return False
    data = text.encode("utf-8")[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", errors="ignore")
    try:
        path.write_text(data, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
        return False
    return True


def owner_path(owner: Owner) -> str:
    """The owner object itself, e.g. /apis/kleinstyle.dev/v1alpha1/namespaces/ns/styleloras/l."""
    return f"/apis/{owner.api_version}/namespaces/{owner.namespace}/{owner.plural}/{owner.name}"


def read_owner(owner: Owner, *, target: ApiTarget | None = None, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """GET the owner (to read its stop annotation); None without an API or when the read fails. Never raises."""
    target = target or api_target()
    if target is None:
        return None
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    url = target.base_url + owner_path(owner)
    try:
        with httpx.Client(verify=target.verify, timeout=timeout_s, trust_env=False) as client:
            response = client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("reading %s failed: %s: %s", url, type(exc).__name__, exc)
        return None
    if not response.is_success:
        log.warning("reading %s failed: HTTP %d", url, response.status_code)
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
