"""An embedded dev cluster: a Kubernetes API emulator, a local Job executor, and the operator, on one machine.

`make demo` and the tests run the whole flow with it; nothing here is used on a real cluster.
"""

from .client import KubeClient
from .cluster import DEFAULT_ROOT, DevCluster
from .emulator import ApiRequest, Emulator, write_kubeconfig
from .errors import ApiError
from .executor import Executor
from .operator_thread import OperatorFactory
from .resources import KindRegistry, ResourceKind, kinds_from_crd
from .store import Admit, ObjectStore
from .wiring import configure_kopf_for_emulator, emulator_connection, point_kubernetes_client

__all__ = [
    "DEFAULT_ROOT",
    "Admit",
    "ApiError",
    "ApiRequest",
    "DevCluster",
    "Emulator",
    "Executor",
    "KindRegistry",
    "KubeClient",
    "ObjectStore",
    "OperatorFactory",
    "ResourceKind",
    "configure_kopf_for_emulator",
    "emulator_connection",
    "kinds_from_crd",
    "point_kubernetes_client",
    "write_kubeconfig",
]
