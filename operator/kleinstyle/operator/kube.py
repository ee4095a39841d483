"""A thin async shell over the Kubernetes REST API for the operator's children: create, get, list, delete.

Generic by apiVersion and plural so one code path serves Jobs, ConfigMaps, RBAC and the custom kinds; bodies and
answers stay plain dicts (the pure reconcile works on dicts). Calls run in a thread: the official client is sync.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kopf
from kleinstyle.contract.pod import SERVICE_ACCOUNT_CA, SERVICE_ACCOUNT_TOKEN, local_path
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from .api import BY_KIND, GROUP, VERSION

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "kleinstyle-operator"  # what managedFields name the operator's writes (children, status)
PLURALS: dict[str, tuple[str, str]] = {
    "Job": ("batch/v1", "jobs"),
    "Pod": ("v1", "pods"),
    "ConfigMap": ("v1", "configmaps"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    **{k.kind: (f"{GROUP}/{VERSION}", k.plural) for k in BY_KIND.values()},
}


def collection_path(kind: str, namespace: str) -> str:
    api_version, plural = PLURALS[kind]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def in_cluster_config() -> client.Configuration | None:
    """The pod's in-cluster credentials (the API's address from the env, its ServiceAccount's token and the CA), None
    outside a pod. Read where `local_path` puts the pod's files, not at the client's fixed paths: a pod the dev cluster
    runs as a process has them under its KLEINSTYLE_ROOTFS. The token is re-read as the kubelet rotates it."""
    configuration = client.Configuration()
    loader = InClusterConfigLoader(
        token_filename=str(local_path(SERVICE_ACCOUNT_TOKEN)), cert_filename=str(local_path(SERVICE_ACCOUNT_CA))
    )
    try:
        loader.load_and_set(configuration)
    except config.ConfigException:
        return None
    return configuration


def load_client_config() -> None:
    """In-cluster credentials when running in a pod, the kubeconfig otherwise."""
    configuration = in_cluster_config()
    if configuration is None:
        config.load_kube_config()
    else:
        client.Configuration.set_default(configuration)


def login(*, settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's login with the credentials `load_client_config` finds: kopf's own (`login_via_client`) reads the
    in-cluster token at the client's fixed path, which a pod run as a process has elsewhere. Outside a pod, kopf's
    own kubeconfig login."""
    configuration = in_cluster_config()
    if configuration is None:
        return kopf.login_via_client(settings=settings, **kwargs)
    header = configuration.get_api_key_with_prefix("BearerToken") or ""  # "bearer TOKEN", as the loader sets it
    scheme, _, token = header.partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        scheme=scheme,
        token=token.strip(),
        trust_env=settings.networking.trust_env,
    )


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self._api = api_client

    @property
    def api(self) -> client.ApiClient:
        """Made on first use, so it takes the client configuration loaded when the operator starts."""
        if self._api is None:
            self._api = client.ApiClient()
        return self._api

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = JSON,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=body)
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    async def request(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> Any:
        return await asyncio.to_thread(self._call, method, path, body, query)

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False when it already exists (adopted: a created child's spec is never re-applied)."""
        path = collection_path(obj["kind"], obj["metadata"]["namespace"])
        try:
            await self.request("POST", path, obj, query=[("fieldManager", FIELD_MANAGER)])
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] | None = await self.request("GET", f"{collection_path(kind, namespace)}/{name}")
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        answer = await self.request("GET", collection_path(kind, namespace), query=[("labelSelector", label_selector)])
        items = (answer or {}).get("items") or []
        api_version = PLURALS[kind][0]
        # List items carry no kind/apiVersion in Kubernetes; the reconcile needs them.
        return [{"apiVersion": api_version, "kind": kind, **item} for item in items]

    async def patch_status(self, kind: str, namespace: str, name: str, changes: dict[str, Any]) -> Any:
        """A JSON merge patch of `changes` on the status subresource (keys set to None are removed)."""
        path = f"{collection_path(kind, namespace)}/{name}/status"
        query = [("fieldManager", FIELD_MANAGER)]
        return await asyncio.to_thread(self._call, "PATCH", path, {"status": changes}, query, MERGE_PATCH)

    async def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> bool:
        """A JSON merge patch of `annotations` on an object's metadata (never its spec); False when the object is gone
        (deleted meanwhile: by the namespace controller when its namespace goes, say), as `delete` says."""
        path = f"{collection_path(kind, namespace)}/{name}"
        body = {"metadata": {"annotations": annotations}}
        query = [("fieldManager", FIELD_MANAGER)]
        try:
            await asyncio.to_thread(self._call, "PATCH", path, body, query, MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", f"{collection_path(kind, namespace)}/{name}", body)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True
