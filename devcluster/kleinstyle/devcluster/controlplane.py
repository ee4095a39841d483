"""`RealCluster`: a real Kubernetes control plane on loopback, for the `cluster` test tier.

The embedded cluster (cluster.py) is an emulator; this is the real thing, built from pinned Go modules by
`make controlplane` (hack/controlplane/build.sh) into a cache outside the repository: etcd, kube-apiserver (RBAC and
Node authorization, service-account tokens, TLS with a CA of its own), kube-controller-manager and kube-scheduler,
each a process of this machine on 127.0.0.1 with free ports and one temporary folder. There is no kubelet, so pods
stay Pending. Startup takes seconds; on exit every process is stopped and the folder removed.

    bin_dir = find_bin_dir()  # None until `make controlplane` has run
    with RealCluster(bin_dir) as cluster:
        cluster.kubectl("apply", "--server-side", "-f", "crds/")
        status, body = cluster.api("GET", "/version")
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .lifecycle import Started, terminate

KUBE_VERSION = "v1.37.2"
PR_SET_PDEATHSIG = 1  # prctl(2)
STAMP = ".stamp"  # written by build.sh last, inside the bin folder it renames into place
# What RealCluster runs (build.sh also builds helm beside them, for the chart's tests).
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")

# The controllers the operator's world needs: Jobs and their pods' garbage, Deployments (the operator's own),
# namespaces, service accounts with their tokens and the kube-root-ca.crt ConfigMap a pod's projected token needs,
# the aggregation that fills admin/edit/view (the chart's tenant roles aggregate into them); for the node agent
# (node_agent.py), node lifecycle (it lifts the not-ready taint the API server puts on every new Node once the node
# reports Ready) and the PersistentVolume binder (the scheduler places no pod whose claim is unbound).
CONTROLLERS = (
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "pod-garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "node-lifecycle-controller",
    "persistentvolume-binder-controller",
    "resourcequota-controller",  # quotas counted as on any cluster: a limits.cpu quota refuses pods without a limit
)
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kleinstyle-admin"
# Who the API server is when it calls a kubelet (pods/log): the node agent's kubelet API answers this user alone.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
LOG_TAIL_LINES = 25


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the thread that started it ends (Linux's
    PR_SET_PDEATHSIG). A test run killed by a timeout, or a SIGKILLed session, leaves no control plane behind; so
    start a RealCluster from a thread that lives as long as it (the main thread, or the fixture's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ControlPlaneError(RuntimeError):
    """The control plane did not start (the message ends with each component's last log lines)."""


class KubectlError(RuntimeError):
    """kubectl exited non-zero; `stderr` is what it printed, as a user would read it."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def cache_dir() -> Path:
    """Where build.sh puts the binaries: ${KLEINSTYLE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kleinstyle}."""
    explicit = os.environ.get("KLEINSTYLE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kleinstyle"


def find_bin_dir() -> Path | None:
    """The built bin folder, or None where `make controlplane` has not run (the stamp is written last)."""
    bin_dir = cache_dir() / "controlplane" / KUBE_VERSION / "bin"
    return bin_dir if (bin_dir / STAMP).is_file() else None


def free_port() -> int:
    """A port free on 127.0.0.1 now: the kernel's pick, so parallel clusters do not collide (another process could
    still take it before the component binds it; the start then fails, naming the component, and can be retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- PKI -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _issue(
    common_name: str,
    *,
    ca: _Issued | None = None,
    organization: str | None = None,
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
    client: bool = False,
) -> _Issued:
    """A certificate for one day, signed by `ca` (self-signed, a CA itself, when `ca` is None). P-256 keys: every
    component accepts them and they take no time to make (the service-account signing key is RSA, made apart)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        ).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    signer = ca.key if ca else key
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


def _kubeconfig(server: str, ca_pem: bytes, user: str, client: _Issued) -> str:
    """A kubeconfig with everything embedded, so it stays valid wherever it is copied."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kleinstyle", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(client.cert_pem), "client-key-data": b64(client.key_pem)},
            }
        ],
        "contexts": [{"name": "kleinstyle", "context": {"cluster": "kleinstyle", "user": user}}],
        "current-context": "kleinstyle",
    }
    return yaml.safe_dump(config, sort_keys=False)


def token_kubeconfig(server: str, ca_file: Path, token: str, user: str) -> str:
    """A kubeconfig for `server` with the cluster's CA (by path) and one bearer token: a ServiceAccount as a client
    outside the cluster (the operator as a process, or behind a proxy at `server`)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kleinstyle", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kleinstyle", "context": {"cluster": "kleinstyle", "user": user}}],
        "current-context": "kleinstyle",
    }
    return yaml.safe_dump(config, sort_keys=False)


# --- processes -------------------------------------------------------------------------------------------------------


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    args: tuple[str, ...] = ()  # what it was started with: a restart starts it so again

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class RealCluster(Started):
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1, started on enter.

    `kubeconfig` is an admin kubeconfig (a client certificate in system:masters), `server` the API's URL, `kubectl()`
    runs the built kubectl against it and `api()` sends one request. Logs are in `root / "logs"` while it runs.

    `node_loss_seconds`: a node whose Lease has not been renewed for that long is NotReady, and its pods are evicted
    at once (the taint-eviction controller runs, the default NoExecute tolerations are 1 s), as a cluster tuned for
    quick failover does; None keeps Kubernetes' defaults (50 s, then 300 s), with no taint eviction at all. Kubelets
    must then renew their Leases well within it. For fault injection: `restart()` a component, `pause()` and
    `resume()` one (SIGSTOP, SIGCONT).
    """

    root_prefix = "kleinstyle-cluster-"

    def __init__(
        self,
        bin_dir: str | Path | None = None,
        *,
        startup_timeout: float = 90.0,
        keep_root: bool = False,
        node_loss_seconds: float | None = None,
    ) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        if found is None:
            raise ControlPlaneError("the control plane is not built: run `make controlplane`")
        missing = [name for name in BINARIES if not (found / name).is_file()]
        if missing:
            raise ControlPlaneError(f"{found} lacks {', '.join(missing)}: run `make controlplane`")
        self.bin_dir = found
        self.startup_timeout = startup_timeout
        self.keep_root = keep_root
        self.node_loss_seconds = node_loss_seconds
        self.root = Path()
        self.server = ""
        self.kubeconfig = Path()
        self.ca_file = Path()
        self.admin_cert_file = Path()
        self.admin_key_file = Path()
        self.startup_seconds = 0.0
        self._components: list[_Component] = []
        self._opener: urllib.request.OpenerDirector | None = None

    # -- lifecycle

    def _start(self) -> None:
        """Start every component and wait until the API is ready and the token controllers work."""
        began = time.monotonic()
        pki, logs = self.root / "pki", self.root / "logs"
        pki.mkdir()
        logs.mkdir()
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"

        ca = _issue("kleinstyle-ca")
        serving = _issue(
            "kube-apiserver",
            ca=ca,
            server_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server_ips=("127.0.0.1", str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))),
        )
        admin = _issue(ADMIN_USER, ca=ca, organization="system:masters", client=True)
        kubelet_client = _issue(KUBELET_CLIENT_USER, ca=ca, client=True)
        # The aggregation layer's own CA and client: aggregated APIs (metrics, Kueue's visibility API) trust the
        # user the API server forwards, and the other components stop complaining of a missing requestheader CA.
        front_proxy_ca = _issue("kleinstyle-front-proxy-ca")
        front_proxy = _issue("front-proxy-client", ca=front_proxy_ca, client=True)
        # The users RBAC's bootstrap policy binds to these components' roles.
        controller_manager = _issue("system:kube-controller-manager", ca=ca, client=True)
        scheduler = _issue("system:kube-scheduler", ca=ca, client=True)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        files = {
            "ca.crt": ca.cert_pem,
            "ca.key": ca.key_pem,
            "apiserver.crt": serving.cert_pem,
            "apiserver.key": serving.key_pem,
            "admin.crt": admin.cert_pem,
            "admin.key": admin.key_pem,
            "apiserver-kubelet-client.crt": kubelet_client.cert_pem,
            "apiserver-kubelet-client.key": kubelet_client.key_pem,
            "front-proxy-ca.crt": front_proxy_ca.cert_pem,
            "front-proxy-client.crt": front_proxy.cert_pem,
            "front-proxy-client.key": front_proxy.key_pem,
            "sa.key": sa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for name, data in files.items():
            (pki / name).write_bytes(data)
            (pki / name).chmod(0o600)
        self.ca_file, self.admin_cert_file, self.admin_key_file = pki / "ca.crt", pki / "admin.crt", pki / "admin.key"
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.kubeconfig.write_text(_kubeconfig(self.server, ca.cert_pem, ADMIN_USER, admin), encoding="utf-8")
        cm_config, sched_config = self.root / "controller-manager.kubeconfig", self.root / "scheduler.kubeconfig"
        cm_config.write_text(
            _kubeconfig(self.server, ca.cert_pem, "system:kube-controller-manager", controller_manager),
            encoding="utf-8",
        )
        sched_config.write_text(
            _kubeconfig(self.server, ca.cert_pem, "system:kube-scheduler", scheduler), encoding="utf-8"
        )

        self._spawn(
            "etcd",
            "--name=kleinstyle",
            f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=kleinstyle=http://127.0.0.1:{peer_port}",
            "--initial-cluster-state=new",
            # A throwaway store: an fsync per write would make every test wait on the disk.
            "--unsafe-no-fsync",
        )
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={self.root / 'apiserver'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC",
            # pods/log goes to the node agent's kubelet API: the node's InternalIP (its Hostname address resolves
            # nowhere), its serving certificate checked against the cluster's CA, the API server known by its own.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The kubernetes Service's endpoint would be 127.0.0.1, which Endpoints validation refuses.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            *self._node_loss_flags("kube-apiserver"),
            f"--audit-policy-file={self._write_audit_policy()}",
            f"--audit-log-path={self.audit_log}",
        )
        self._wait_for("the API server's /readyz", lambda: self._get_ok("/readyz"))
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={cm_config}",
            f"--authentication-kubeconfig={cm_config}",
            f"--authorization-kubeconfig={cm_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.root / 'controller-manager'}",
            f"--controllers={','.join(self._controllers())}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--cluster-name=kleinstyle",
            "--leader-elect=false",
            *self._node_loss_flags("kube-controller-manager"),
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={sched_config}",
            f"--authentication-kubeconfig={sched_config}",
            f"--authorization-kubeconfig={sched_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.root / 'scheduler'}",
            "--leader-elect=false",
        )
        # The default ServiceAccount appears once the controller manager runs its controllers as itself.
        self._wait_for(
            "the default ServiceAccount", lambda: self._get_ok("/api/v1/namespaces/default/serviceaccounts/default")
        )
        self.startup_seconds = time.monotonic() - began

    def _controllers(self) -> tuple[str, ...]:
        """CONTROLLERS, and the taint-eviction controller where lost nodes' pods are to be evicted."""
        return (*CONTROLLERS, "taint-eviction-controller") if self.node_loss_seconds is not None else CONTROLLERS

    def _node_loss_flags(self, component: str) -> tuple[str, ...]:
        """Flags that make a lost node's pods go within `node_loss_seconds` (none where it is None)."""
        if self.node_loss_seconds is None:
            return ()
        if component == "kube-apiserver":  # the tolerations DefaultTolerationSeconds gives every pod
            return ("--default-not-ready-toleration-seconds=1", "--default-unreachable-toleration-seconds=1")
        return (f"--node-monitor-grace-period={self.node_loss_seconds:g}s", "--node-monitor-period=1s")

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (JSON lines): who listed and watched what, with the request's URI."""
        return self.root / "logs" / "audit.log"

    def audited(self) -> list[dict[str, Any]]:
        """The audit log's events so far (each request once, at ResponseComplete or its end)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text(encoding="utf-8").splitlines() if line]

    def _write_audit_policy(self) -> Path:
        """Lists and watches at Metadata level (their URIs show the selectors a client asked for); nothing else,
        so the log stays small."""
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "verbs": ["list", "watch"]}, {"level": "None"}],
        }
        path = self.root / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(policy), encoding="utf-8")
        return path

    def _spawn(self, name: str, *args: str) -> None:
        self._components.append(self._launch(name, args, "wb"))

    def _launch(self, name: str, args: tuple[str, ...], mode: str) -> _Component:
        log = self.root / "logs" / f"{name}.log"
        with log.open(mode) as out:
            process = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop them in order
                preexec_fn=die_with_parent,
            )
        return _Component(name, process, log, args)

    # -- faults

    def _component(self, name: str) -> _Component:
        for component in self._components:
            if component.name == name:
                return component
        raise ControlPlaneError(f"no component {name} runs (known: {', '.join(c.name for c in self._components)})")

    def pid(self, name: str) -> int:
        """The process id of component `name` (etcd, kube-apiserver, ...)."""
        return self._component(name).process.pid

    def restart(self, name: str, *, kill: bool = False) -> float:
        """Stop component `name` (SIGTERM, or SIGKILL when `kill`) and start it again with the same arguments and
        port; for the API server, wait until /readyz answers again. Returns the seconds it was away. Clients see what
        they see on a real cluster when it restarts: refused connections, then a server without its watch cache."""
        index = self._components.index(self._component(name))
        old = self._components[index]
        began = time.monotonic()
        terminate(old.process, 30, signal.SIGKILL if kill else signal.SIGTERM)
        self._components[index] = self._launch(name, old.args, "ab")
        if name == "kube-apiserver":
            self._wait_for("the restarted API server's /readyz", lambda: self._get_ok("/readyz"))
        return time.monotonic() - began

    def pause(self, name: str) -> None:
        """SIGSTOP component `name`: a disk stall or a GC pause, as far as its clients can tell (etcd: every write and
        quorum read hangs, the API server's requests time out)."""
        os.kill(self.pid(name), signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT what `pause` stopped."""
        os.kill(self.pid(name), signal.SIGCONT)

    def _wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll `ready()` until it is true; fail at once, with the logs, when a component exits."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            exited = [c for c in self._components if c.process.poll() is not None]
            if exited:
                names = ", ".join(f"{c.name} (exit {c.process.returncode})" for c in exited)
                raise ControlPlaneError(f"waiting for {what}: {names} exited\n{self.logs()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{what} not ready after {self.startup_timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        """Each component's last log lines, for a failure message."""
        return "\n".join(f"--- {c.name} ({c.log}):\n{c.tail()}" for c in self._components)

    def stop(self) -> None:
        """Stop the components in reverse order (SIGTERM, then SIGKILL after 10s) and remove the folder."""
        for component in reversed(self._components):
            terminate(component.process, 10)
        self._components.clear()
        if self.root != Path() and not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- clients

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl with the admin kubeconfig; raise KubectlError on failure unless `check` is off."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.root / "kubectl-cache")}
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(args, result.returncode, result.stdout, result.stderr)
        return result

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> tuple[int, Any]:
        """One request as the admin: (status code, the decoded JSON body, or the text where it is not JSON)."""
        if self._opener is None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.load_cert_chain(str(self.admin_cert_file), str(self.admin_key_file))
            # No proxy: urllib would send even 127.0.0.1 through HTTPS_PROXY unless NO_PROXY names it.
            self._opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.status, _decode(response)
        except urllib.error.HTTPError as error:
            return error.code, _decode(error)

    def client_certificate(self, user: str, group: str | None = None) -> tuple[Path, Path]:
        """A client certificate and key for `user` in `group`, signed by the cluster's CA, as files in the cluster's
        folder: how a component outside the control plane authenticates (the node agent's kubelets are
        `system:node:NAME` in `system:nodes`, whom the Node authorizer confines to their own node's objects)."""
        return self._write_issued(user.replace(":", "-"), _issue(user, ca=self._ca(), organization=group, client=True))

    def serving_certificate(self, name: str, ips: Sequence[str]) -> tuple[Path, Path]:
        """A serving certificate for `ips`, signed by the cluster's CA: the node agent's kubelet API, which the API
        server calls for pods/log and checks against that CA (--kubelet-certificate-authority)."""
        return self._write_issued(f"{name}-serving", _issue(name, ca=self._ca(), server_ips=ips))

    def _ca(self) -> _Issued:
        pki = self.root / "pki"
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ControlPlaneError(f"{pki / 'ca.key'} is not the EC key RealCluster makes")
        return _Issued(x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes()), ca_key)

    def _write_issued(self, stem: str, issued: _Issued) -> tuple[Path, Path]:
        pki = self.root / "pki"
        cert_file, key_file = pki / f"{stem}.crt", pki / f"{stem}.key"
        cert_file.write_bytes(issued.cert_pem)
        key_file.write_bytes(issued.key_pem)
        key_file.chmod(0o600)
        return cert_file, key_file

    def _get_ok(self, path: str) -> bool:
        with contextlib.suppress(OSError):
            status, _ = self.api("GET", path, timeout=5)
            return status == 200
        return False


def _decode(response: IO[bytes]) -> Any:
    raw = response.read().decode("utf-8", errors="replace")
    try:
        return json.loads(raw)
    except ValueError:
        return raw
