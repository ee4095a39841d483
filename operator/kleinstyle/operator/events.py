"""Events about kleinstyle's objects, posted by the operator itself (not kopf's background poster): one request each,
whose refusal is handled here. In a namespace being deleted nothing may be created, an Event included: that refusal
is the namespace going away, not an error, and is logged as such instead of retried nine times at ERROR."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from .kube import Kube

logger = logging.getLogger(__name__)
COMPONENT = "kleinstyle-operator"
MESSAGE_LIMIT = 1024  # what the API server keeps of an Event's message


def namespace_terminating(exc: ApiException) -> bool:
    """A create refused because its namespace is being deleted (403, cause NamespaceTerminating)."""
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except ValueError:
        return False
    return exc.status == 403 and any(c.get("reason") == "NamespaceTerminating" for c in details.get("causes") or [])


def event(body: Any, type_: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A core/v1 Event about `body`, as `kubectl describe` lists it."""
    meta = body["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


async def post(kube: Kube, body: Any, type_: str, reason: str, message: str) -> None:
    """Post one Event about `body`; in a namespace being deleted, a log line instead."""
    namespace = body["metadata"]["namespace"]
    try:
        await kube.request(
            "POST", f"/api/v1/namespaces/{namespace}/events", event(body, type_, reason, message, datetime.now(UTC))
        )
    except ApiException as exc:
        if not namespace_terminating(exc):
            raise
        logger.info(f"namespace {namespace} is being deleted: no Event {reason} ({message})")
