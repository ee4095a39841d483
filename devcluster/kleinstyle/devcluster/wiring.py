"""Pointing kopf and the `kubernetes` client at the emulator.

kopf, run against the emulator, needs:

- `settings.scanning.disabled = True` and explicit namespaces (`kopf.operator(namespaces=[...])` or
  `clusterwide=True`): namespace patterns and CRD scanning need cluster-wide observation the operator does not
  need here (and not having it keeps the same RBAC as a real namespaced install).
- `settings.peering.standalone = True`: no KopfPeering objects.
- annotation-based progress and diff-base storage: a CR's structural schema would prune `status.kopf` on a real
  cluster unless it preserves unknown fields, so annotations behave the same in both places.
- credentials: `KUBECONFIG` set *and* `kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION` re-pointed (the
  client reads the variable once, at import), or a login handler returning `emulator_connection(url)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .emulator import DEV_TOKEN

if TYPE_CHECKING:
    import kopf

PROGRESS_PREFIX = "kopf.zalando.org"


def configure_kopf_for_emulator(
    settings: kopf.OperatorSettings, *, prefix: str = PROGRESS_PREFIX
) -> kopf.OperatorSettings:
    """Apply the settings kopf needs against the emulator (safe on a real cluster too); returns `settings`.

    Progress and diff-base storage switch to annotations (with `prefix`) unless they already are annotation-based,
    so an operator's own storage settings survive when this runs after them."""
    import kopf

    # kopf SIGKILLs its thread when it exits other than by its stop flag; here that thread also runs the emulator
    # client, the executor and the tests.
    settings.process.ultimate_exiting_timeout = None
    settings.scanning.disabled = True
    settings.peering.standalone = True
    if not isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage):
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    if not isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage):
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
    # The emulator ends watches after this long; kopf reconnects from the last resourceVersion it saw.
    settings.watching.server_timeout = 60
    # Retry API errors quickly: the emulator is local, a failure is a race, not an overloaded server.
    settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1.0]
    return settings


def emulator_connection(url: str, namespace: str = "default") -> kopf.ConnectionInfo:
    """Credentials for an `@kopf.on.login()` handler, instead of the environment (plain http, a dummy token)."""
    import kopf

    return kopf.ConnectionInfo(server=url, token=DEV_TOKEN, insecure=True, default_namespace=namespace)


def point_kubernetes_client(kubeconfig: str | Path) -> Callable[[], None]:
    """Make `KUBECONFIG`, the `kubernetes` client's default location and its default Configuration use this file.

    Returns a function that restores the previous state.
    """
    kubeconfig = str(kubeconfig)
    previous_env = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kubeconfig
    try:
        import kubernetes
    except ImportError:  # the operator extra is not installed: the environment variable is all there is to set
        kubernetes = None
    previous_location = previous_config = None
    if kubernetes is not None:
        previous_location = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        previous_config = kubernetes.client.Configuration.get_default_copy()
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
        kubernetes.config.load_kube_config(config_file=kubeconfig)

    def restore() -> None:
        if previous_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous_env
        if kubernetes is not None:
            kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous_location
            kubernetes.client.Configuration.set_default(previous_config)

    return restore
