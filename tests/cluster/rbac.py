"""RBAC as the real API server enforces it: the chart installed with the built helm, its operator running as the
chart's ServiceAccount and nothing more, tenants as the users a platform team binds to `edit` and `view`.

An `Identity` sends requests, runs kubectl and asks `can-i` as one subject, with its own credential and no other:
a user a client certificate signed by the cluster's CA (as an OIDC login or a platform's certificate would make
them), a ServiceAccount a TokenRequest token. Each has a kubeconfig holding that credential alone, so neither the
requests nor the kubectl it runs ever carry the admin's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.lifecycle import terminate
from kleinstyle.devcluster.real_e2e import helm, helm_env
from kleinstyle.operator.kube import PLURALS

JSON = "application/json"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"
# Where each kind lives: the operator's own table, and Secrets, which it never touches but tenants must not read.
KINDS: dict[str, tuple[str, str]] = {**PLURALS, "Secret": ("v1", "secrets")}
CUSTOM_KINDS = ("StyleBoard", "StyleLoRA", "GenerationJob", "LoRAFusion")
# A refused or unauthenticated request in the operator's log: urllib3's DEBUG line for each response
# ("POST ... HTTP/1.1" 403), and any warning or error naming one (kopf's APIForbiddenError, the operator's
# "403 Forbidden" ApiError). DEBUG lines of other loggers are left out: kopf dumps bodies there, and a status may
# quote a refusal.
RESPONSE_REFUSED = re.compile(r'" 40[13] ')
REFUSED = re.compile(r"(?i)forbidden|unauthorized|\b40[13]\b")


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll `probe` until it returns something true, and return that; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(interval)
    return result


def path(kind: str, namespace: str | None = None, name: str = "", subresource: str = "") -> str:
    """The REST path of a kind's collection (every namespace when `namespace` is None), an object or a subresource."""
    api_version, plural = KINDS[kind]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    tail = "/".join(part for part in (name, subresource) if part)
    return f"{prefix}{scope}/{plural}" + (f"/{tail}" if tail else "")


def group_resource(kind: str) -> tuple[str, str]:
    """(API group, plural) of a kind, as RBAC rules and SubjectAccessReviews name it."""
    api_version, plural = KINDS[kind]
    return (api_version.rpartition("/")[0], plural)


@dataclass
class Identity:
    """One subject of RBAC: a user with a client certificate, or a ServiceAccount with a bearer token."""

    cluster: RealCluster
    name: str  # the username RBAC sees
    token: str | None = None
    certificate: tuple[Path, Path] | None = None  # (certificate, key)
    kubeconfig: Path | None = None  # holding this credential and no other
    _opener: urllib.request.OpenerDirector = field(init=False, repr=False)

    def __post_init__(self) -> None:
        assert (self.token is None) != (self.certificate is None), "a token or a client certificate"
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        if self.certificate is not None:
            context.load_cert_chain(*map(str, self.certificate))
        # No proxy: urllib would send even 127.0.0.1 through HTTPS_PROXY.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def request(
        self, method: str, url: str, body: Any = None, *, content_type: str = JSON, first_line: bool = False
    ) -> tuple[int, Any]:
        """(status, decoded body) of one request as this identity. `first_line` reads a watch's first event only."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.cluster.server + url, data=data, method=method)
        request.add_header("Accept", JSON)
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=30) as response:
                raw = response.readline() if first_line else response.read()
                return response.status, decode_body(raw)
        except urllib.error.HTTPError as error:
            return error.code, decode_body(error.read())

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """The built kubectl with this identity's kubeconfig (its exit status left to the caller)."""
        assert self.kubeconfig is not None, f"{self.name} has no kubeconfig"
        return self.cluster.kubectl("--kubeconfig", str(self.kubeconfig), *args, input=input, check=False)

    def can_i(self, verb: str, kind: str, namespace: str | None, *, subresource: str = "", name: str = "") -> bool:
        """A SelfSubjectAccessReview as this identity: the request `kubectl auth can-i` sends."""
        group, plural = group_resource(kind)
        attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource, "name": name}
        if namespace:
            attributes["namespace"] = namespace
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview"}
        status, answer = self.request(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {**review, "spec": {"resourceAttributes": attributes}},
        )
        assert status == 201, answer
        return bool(answer["status"]["allowed"])


def decode_body(raw: bytes) -> Any:
    """A response body: its JSON, or its text where it is none."""
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def write_kubeconfig(cluster: RealCluster, name: str, credential: dict[str, str], path: Path, namespace: str) -> Path:
    """A kubeconfig with the cluster's CA, its server and one credential (a token, or certificate and key files)."""
    ca = base64.b64encode(Path(cluster.ca_file).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": name, "user": credential}],
        "contexts": [{"name": name, "context": {"cluster": "cluster", "user": name, "namespace": namespace}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o600)
    return path


def user(cluster: RealCluster, name: str, namespace: str, folder: Path) -> Identity:
    """A user signing in with a client certificate the cluster's CA signed for `name` (no group)."""
    certificate = cluster.client_certificate(name)
    credential = {"client-certificate": str(certificate[0]), "client-key": str(certificate[1])}
    kubeconfig = write_kubeconfig(cluster, name, credential, folder / f"{name}.kubeconfig", namespace)
    return Identity(cluster, name, certificate=certificate, kubeconfig=kubeconfig)


def mint_token(cluster: RealCluster, namespace: str, account: str, seconds: int = 3600) -> str:
    """A TokenRequest for the ServiceAccount, as the kubelet makes for a pod's projected token."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}}
    status, answer = cluster.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", request)
    assert status == 201, answer
    token: str = answer["status"]["token"]
    return token


def service_account(cluster: RealCluster, namespace: str, account: str, folder: Path) -> Identity:
    """The ServiceAccount as its own client: a fresh token in a kubeconfig holding the CA, the server and the token."""
    token = mint_token(cluster, namespace, account)
    path = folder / f"{namespace}.{account}.kubeconfig"
    kubeconfig = write_kubeconfig(cluster, account, {"token": token}, path, namespace)
    return Identity(cluster, f"system:serviceaccount:{namespace}:{account}", token, kubeconfig=kubeconfig)


def ensure_namespace(cluster: RealCluster, name: str, labels: dict[str, str] | None = None) -> str:
    """The namespace `name`, created with `labels` unless it exists."""
    status, body = cluster.api("GET", f"/api/v1/namespaces/{name}")
    if status == 404:
        metadata = {"name": name, "labels": labels or {}}
        status, body = cluster.api(
            "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}
        )
        assert status == 201, body
    return name


def bind(cluster: RealCluster, namespace: str, cluster_role: str, user_name: str) -> None:
    """A RoleBinding of `cluster_role` to a user in `namespace` only, as a platform team grants a tenant."""
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{user_name}-{cluster_role}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": user_name}],
    }
    status, body = cluster.api(
        "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", binding
    )
    assert status in (201, 409), body


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the chart -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The chart as helm installed it: where, under which name, and the names its templates gave."""

    cluster: RealCluster
    name: str
    namespace: str
    fullname: str  # the operator's ServiceAccount, ClusterRole(Binding), ConfigMap and Deployment
    helm_env: dict[str, str]
    values_file: Path
    install_output: str

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The built helm against this cluster as the admin; raises with helm's own words when it fails."""
        return helm(self.cluster, self.helm_env, *args)


def install_chart(
    cluster: RealCluster, chart: Path, values: dict[str, Any], home: Path, *, name: str, namespace: str
) -> Release:
    """`helm install --create-namespace` with a values file, as a platform team runs it."""
    home.mkdir(parents=True, exist_ok=True)
    values_file = home / "values.yaml"
    values_file.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    env = helm_env(home)
    installed = helm(
        cluster,
        env,
        "install",
        name,
        str(chart),
        "--namespace",
        namespace,
        "--create-namespace",
        "-f",
        str(values_file),
    )
    # The operator's objects share one name (the chart's fullname): read it off the Deployment helm made.
    selector = f"app.kubernetes.io/instance={name}"
    status, deployments = cluster.api(
        "GET", f"/apis/apps/v1/namespaces/{namespace}/deployments?labelSelector={selector}"
    )
    assert status == 200, deployments
    (deployment,) = deployments["items"]
    fullname = deployment["metadata"]["name"]
    return Release(cluster, name, namespace, fullname, env, values_file, installed.stdout)


# --- the operator, as the chart's ServiceAccount ---------------------------------------------------------------------


class OperatorProcess:
    """`kleinstyle operator` as the chart's Deployment runs it (its args, its ConfigMap), in a process of this machine
    whose only credential is a kubeconfig with the ServiceAccount's token: whatever it reaches, RBAC let it reach.

    A process rather than a thread: the kubernetes client's configuration is global to a process, so the admin's
    kubeconfig of the tests can never leak into the operator's requests. It logs at DEBUG, so every response status
    is in the log (urllib3's line per request) and `refusals()` sees a 403 even where the code handles it.
    """

    def __init__(self, release: Release, account: Identity, folder: Path) -> None:
        self.release, self.account, self.folder = release, account, folder
        self.log = folder / "operator.log"
        self.health = f"http://127.0.0.1:{free_port()}/healthz"
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The Deployment's container args, with the paths and ports of this machine, and JSON logs at DEBUG."""
        cluster, ns, name = self.release.cluster, self.release.namespace, self.release.fullname
        status, deployment = cluster.api("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        assert status == 200, deployment
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        status, configmap = cluster.api("GET", f"/api/v1/namespaces/{ns}/configmaps/{name}")
        assert status == 200, configmap
        config = yaml.safe_load(configmap["data"]["operator.yaml"])
        config["metricsPort"] = free_port()  # the chart's 8080 is the pod's; here it is this machine's
        config_file = self.folder / "operator.yaml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        local = {
            "--config": str(config_file),
            "--liveness": self.health,
            "--log-level": "DEBUG",
            "--log-format": "json",
        }
        args = list(container["args"])
        for index, arg in enumerate(args[:-1]):
            if arg in local:
                args[index + 1] = local.pop(arg)
        assert not local, f"the Deployment's args lack {sorted(local)}: {container['args']}"
        return [str(Path(sys.executable).with_name("kleinstyle")), *args]

    def start(self, timeout: float = 30.0) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}  # never in-cluster config
        env["KUBECONFIG"] = str(self.account.kubeconfig)
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        wait_for(f"the operator's {self.health}", self._healthy, timeout=timeout, interval=0.2)
        return self

    def _healthy(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the operator exited {self._process.returncode}:\n{self.tail()}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.health, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (kopf stops its daemons and watches), SIGKILL after 15 s."""
        if self._process is not None:
            terminate(self._process, 15)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def refusals(self) -> list[str]:
        """Every log line where the API server refused (403) or did not know (401) the operator; a line that is no
        JSON record (a traceback) counts when it names one."""
        found = []
        for line in self.text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "ERROR", "message": line}
            message = str(record.get("message", ""))
            if record.get("logger") == "urllib3.connectionpool":
                refused = RESPONSE_REFUSED.search(message)
            else:
                refused = record.get("level") in ("WARNING", "ERROR", "CRITICAL") and REFUSED.search(message)
            if refused:
                found.append(line)
        return found


def rules_without(rules: Sequence[dict[str, Any]], resource: str, verb: str) -> list[dict[str, Any]]:
    """`rules` with `verb` taken away from every rule naming `resource`: the chart's RBAC with one grant missing."""
    narrowed = []
    for rule in rules:
        verbs = [v for v in rule["verbs"] if not (resource in rule.get("resources", []) and v == verb)]
        narrowed.append({**rule, "verbs": verbs})
    return [rule for rule in narrowed if rule["verbs"]]


@dataclass
class Tenant:
    """A user of one namespace, holding one of Kubernetes' user-facing roles there (edit or view) and nothing else."""

    who: Identity
    namespace: str
    role: str
