"""Run the operator: kopf with kleinstyle's handlers and settings, in a cluster or against the dev cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from . import kueue, metrics
from .config import OperatorConfig
from .handlers import register
from .indexes import CHILD_KINDS
from .kube import PLURALS, Kube, load_client_config
from .naming import OWNER_UID
from .wakers import Wakers

logger = logging.getLogger(__name__)


def configure(settings: kopf.OperatorSettings) -> None:
    """Settings that must hold everywhere: kopf's bookkeeping in annotations, not in our structural status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kleinstyle.dev")
    # kopf keeps the "last handled" state to diff specs for change handlers; ours read the spec afresh (daemons), so
    # the spec is left out of it: a GenerationJob within the CRD's limits (64 prompts of CJK text, escaped six bytes
    # a character) would push that annotation past the 256 KiB the API allows, and the object would stay
    # Terminating for ever when the finalizer's patch is refused with it.
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.kleinstyle.dev", key="last-handled-configuration", ignored_fields=["spec"]
    )
    # The children are watched with a server-side label selector: only the operator's own Jobs, ConfigMaps and RBAC
    # come to this process, not every one in the cluster (nor its RBAC rights to see them all).
    for kind in CHILD_KINDS:
        api_version, plural = PLURALS[kind]
        group, _, version = api_version.rpartition("/")
        settings.watching.label_selectors[group, version, plural] = OWNER_UID
    settings.watching.label_selectors["", "v1", "pods"] = OWNER_UID
    settings.watching.label_selectors[kueue.GROUP, "workloads"] = kueue.JOB_UID_LABEL
    settings.persistence.finalizer = "kleinstyle.dev/cleanup"
    settings.posting.level = logging.WARNING  # Our own Events say what matters; kopf's are noise to a user.
    # Log lines stay log lines: a failure logged at every retry must not become an Event at every retry too.
    settings.posting.loggers = False
    # Explicit namespaces need no namespace scanning, hence no cluster-wide permission to list namespaces.
    settings.scanning.disabled = True
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 60


# An API server restarting, shedding load (429) or whose etcd timed out (500, 503, 504) answers again in a moment;
# so does one just restarted whose RBAC authorizer has not synced yet: it refuses discovery, which the bootstrap
# policy opens to every authenticated client, with 403 (bench/chaos.py met it at the default size).
TRANSIENT = frozenset({403, 429, 500, 502, 503, 504})
STARTUP_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)  # about a minute, as kopf's own requests wait


async def workload_version(kube: Kube, backoff: Sequence[float] = STARTUP_BACKOFF_S) -> str | None:
    """The newest version of Kueue's Workload API the cluster serves (discovery, open to every client); None without
    Kueue. Checked once at start: installing Kueue later takes an operator restart to be seen. A transient refusal
    or a lost connection is waited out (`backoff`, seconds between tries), so that an operator started while the API
    server restarts does not exit; another refusal (401, bad credentials) fails at once, and a 403 that outlasts the
    backoff is a policy that closed discovery."""
    for delay in (*backoff, None):
        try:
            return await _workload_version(kube)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            if (isinstance(exc, ApiException) and exc.status not in TRANSIENT) or delay is None:
                raise
            logger.warning(f"asking the API server about Kueue failed ({exc!s:.200}); again in {delay:g}s")
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last try raises or returns")


async def _workload_version(kube: Kube) -> str | None:
    try:
        group = await kube.request("GET", f"/apis/{kueue.GROUP}")
    except ApiException as exc:
        if exc.status == 404:
            logger.info("Kueue is not installed: no Workloads to mirror into status")
            return None
        raise
    served = [v.get("version") for v in (group or {}).get("versions") or []]
    for version in (v for v in kueue.VERSIONS if v in served):
        resources = await kube.request("GET", f"/apis/{kueue.GROUP}/{version}")
        if any(r.get("name") == "workloads" for r in (resources or {}).get("resources") or []):
            return version
    return None


async def run_operator(
    cfg: OperatorConfig,
    namespaces: Sequence[str],
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    liveness_endpoint: str | None = None,
    tune: Callable[[kopf.OperatorSettings], object] | None = None,
    kube: Kube | None = None,
) -> None:
    """Run until `stop_flag` is set. An empty `namespaces` watches the whole cluster. `tune` adjusts kopf's
    settings after ours (the dev cluster uses it to run kopf inside its own process and event loop)."""
    load_client_config()
    kube = kube or Kube()
    registry = kopf.OperatorRegistry()
    kueue_version = await workload_version(kube) if cfg.kueue_workloads else None
    register(registry, cfg, kueue_version)
    watched = ", ".join(namespaces) or "the whole cluster"
    logger.info(f"watching {watched}; Kueue Workloads: {kueue_version or 'not mirrored'}")
    settings = kopf.OperatorSettings()
    configure(settings)
    if tune is not None:
        tune(settings)
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port)
    await kopf.operator(
        registry=registry,
        settings=settings,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(config=cfg, kube=kube, wakers=Wakers()),
    )
