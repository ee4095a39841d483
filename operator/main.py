"""Run the operator: kopf with kleinstyle's handlers and settings, in a cluster or against the dev cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import kopf

from . import metrics
from .config import OperatorConfig
from .handlers import Wakers, register
from .kube import Kube, load_client_config


def configure(settings: kopf.OperatorSettings) -> None:
    """Settings that must hold everywhere: kopf's bookkeeping in annotations, not in our structural status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kleinstyle.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.kleinstyle.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "kleinstyle.dev/cleanup"
    settings.posting.level = logging.WARNING  # Our own Events say what matters; kopf's are noise to a user.
    # Explicit namespaces need no namespace scanning, hence no cluster-wide permission to list namespaces.
    settings.scanning.disabled = True
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 60


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
    registry = kopf.OperatorRegistry()
    register(registry, cfg)
    settings = kopf.OperatorSettings()
    configure(settings)
    if tune is not None:
        tune(settings)
    if cfg.metricsPort:
        metrics.serve(cfg.metricsPort)
    await kopf.operator(
        registry=registry,
        settings=settings,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(config=cfg, kube=kube or Kube(), wakers=Wakers()),
    )
