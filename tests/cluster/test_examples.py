"""examples/ applied to a real control plane: every resource reaches Succeeded, reconciled by the chart's operator
running as its Deployment's pod under exactly the chart's RBAC.

What `make demo` shows on the emulator, with nothing emulated but the kubelet (devcluster/real_e2e.py): helm installs
the chart with the demo's configuration as values; the node agent runs the Deployment's pod (`kleinstyle operator`
with the chart's args, from this repository's .venv) with the projected token of the chart's ServiceAccount as its
only credential; a tenant bound to `edit` applies examples/ as they are, into a namespace of their own; the real
scheduler places the prepare and fuse Jobs on the CPU node and the training and generation Jobs on the GPU node,
where they run for real on the tiny klein. Prometheus, where `make controlplane` fetched it, scrapes the operator
meanwhile, and every query of the chart's Grafana dashboard must answer on what it scraped (dashboard.py). The
summary line is printed, and written to $KLEINSTYLE_E2E_SUMMARY when that names a file, for `make e2e` to show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from kleinstyle.contract.pod import ROOTFS_ENV, SERVICE_ACCOUNT_TOKEN, local_path
from kleinstyle.devcluster import real_e2e
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.demo import NAMESPACE, dev_config, load_documents, local_artifact
from kleinstyle.devcluster.node_agent import NodeAgent
from kleinstyle.devcluster.pod_setup import pod_rootfs
from kleinstyle.operator.config import OperatorConfig

from .conftest import CHART, CRDS, RELEASE, REPO, started_cluster
from .dashboard import ScrapedRun
from .rbac import Identity, OperatorProcess, bind, ensure_namespace, install_chart, user, wait_for

EXAMPLES = REPO / "examples"
SUMMARY_ENV = "KLEINSTYLE_E2E_SUMMARY"
SETTLE_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RealCluster]:
    """A control plane of its own: the chart is cluster-wide and the node agent registers the chart's nodes, so no
    other test's release or node may share it."""
    yield from started_cluster(helm=True)


def operator_pod(cluster: RealCluster, namespace: str) -> dict[str, Any] | None:
    """The chart's operator pod once its container runs (the node agent reports it Running), else None."""
    selector = f"app.kubernetes.io/instance={RELEASE}"
    _, pods = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
    for pod in pods.get("items") or []:
        if (pod.get("status") or {}).get("phase") == "Running":
            return dict(pod)
    return None


def still_running(cluster: RealCluster, pod: dict[str, Any], log: Path) -> Callable[[], None]:
    """A check that fails, with the operator's last words, once its container has stopped or restarted."""
    meta = pod["metadata"]

    def check() -> None:
        status, found = cluster.api("GET", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
        container = ((found.get("status") or {}).get("containerStatuses") or [{}])[0] if status == 200 else {}
        if container.get("restartCount") or "running" not in (container.get("state") or {}):
            previous = log.with_suffix(".previous.log")
            raise AssertionError(
                f"the operator's container stopped: {container.get('state') or status}\n"
                f"its log (tail):\n{tail(previous if previous.exists() else log)}"
            )

    return check


def apply_examples_until_settled(
    cluster: RealCluster, tenant: Identity, namespace: str, operator: dict[str, Any], log: Path
) -> list[dict[str, Any]]:
    """examples/ applied by `tenant`, and every resource once settled; fails, with the operator's last words, if they
    do not settle in time or the operator's container stops meanwhile."""
    applied = tenant.kubectl("apply", "-f", str(EXAMPLES))
    assert applied.returncode == 0, applied.stderr
    expected = len(load_documents([str(EXAMPLES)]))
    try:
        return real_e2e.wait_until_settled(
            cluster, namespace, expected, SETTLE_TIMEOUT, check=still_running(cluster, operator, log)
        )
    except TimeoutError as timeout:
        raise AssertionError(f"{timeout}\noperator log (tail):\n{tail(log)}") from None


def user_info(bearer: Identity) -> dict[str, Any]:
    """Who the API server takes `bearer` for: a SelfSubjectReview (`kubectl auth whoami`)."""
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    status, answer = bearer.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review)
    assert status == 201, answer
    user_info: dict[str, Any] = answer["status"]["userInfo"]
    return user_info


def assert_installed_config_is_the_demos(
    cluster: RealCluster, namespace: str, name: str, root: Path, metrics_port: int
) -> None:
    """The operator.yaml the chart rendered from the values holds the demo's settings, as the operator reads them
    (and the metrics port Prometheus scrapes)."""
    status, configmap = cluster.api("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    assert status == 200, configmap
    installed = OperatorConfig.model_validate(yaml.safe_load(configmap["data"]["operator.yaml"]))
    demo_config = dev_config(root).model_copy(update={"metrics_port": metrics_port})
    wire, demo = installed.model_dump(by_alias=True), demo_config.model_dump(by_alias=True)
    keys = real_e2e.DEMO_CONFIG_KEYS
    assert {key: wire[key] for key in keys} == {key: demo[key] for key in keys}


def process_environment(pod: dict[str, Any]) -> dict[str, str] | None:
    """The environment of the pod's process (the node agent reports it as containerID local://PID), where readable."""
    pid = pod["status"]["containerStatuses"][0].get("containerID", "").removeprefix("local://")
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_examples_reach_succeeded_under_the_charts_operator_run_as_its_pod(
    cluster: RealCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    root = tmp_path / "node"
    values = real_e2e.chart_values(root)
    scraped = ScrapedRun(values)  # Prometheus scrapes the operator's metrics: the chart's dashboard is checked on them
    with ThreadPoolExecutor(1) as pool:
        volumes = pool.submit(real_e2e.lay_out_volumes, root)  # the tiny klein takes seconds: meanwhile, the rest

        namespace = ensure_namespace(cluster, NAMESPACE)
        real_e2e.bind_claims(cluster, namespace, root)
        with NodeAgent(cluster, root, entrypoint=real_e2e.OPERATOR_ENTRYPOINT) as agent, scraped:
            release = install_chart(
                cluster,
                CHART,
                values,
                tmp_path / "helm",
                name=RELEASE,
                namespace=real_e2e.RELEASE_NAMESPACE,
            )
            account = f"system:serviceaccount:{release.namespace}:{release.fullname}"
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
            assert_installed_config_is_the_demos(cluster, release.namespace, release.fullname, root, scraped.port)
            # A tenant as a platform team makes one: a user bound to Kubernetes' edit in their namespace, which the
            # chart's tenant roles aggregate into (the controller manager does that a moment after the install).
            bind(cluster, namespace, "edit", "alice")
            tenant = user(cluster, "alice", namespace, tmp_path)
            wait_for("alice may create StyleBoards", lambda: tenant.can_i("create", "StyleBoard", namespace))
            pod = wait_for("the operator's pod Running", lambda: operator_pod(cluster, release.namespace), timeout=60)
            log = agent.log_path(pod)
            volumes.result()
            installed = time.monotonic()

            objs = apply_examples_until_settled(cluster, tenant, namespace, pod, log)
            settled = time.monotonic()
            unanswered = scraped.unanswered(namespace)

            # The operator's only credential: the token projected into its pod, the chart's ServiceAccount's, bound
            # to the pod; its process has no kubeconfig to fall back on.
            rootfs = pod_rootfs(agent.root, pod["metadata"]["namespace"], pod["metadata"]["name"])
            token = local_path(SERVICE_ACCOUNT_TOKEN, {ROOTFS_ENV: str(rootfs)}).read_text(encoding="utf-8")
            operator = Identity(cluster, account, token)
            who = user_info(operator)
            environment = process_environment(operator_pod(cluster, release.namespace) or pod)
            # Its log, at DEBUG, holds every response's status: the scan of the chart tests reads it.
            scan = tmp_path / "scan"
            scan.mkdir()
            (scan / "operator.log").symlink_to(log)
            refusals = OperatorProcess(release, operator, scan).refusals()

    failed = {
        f"{o['kind']}/{o['metadata']['name']}": (o.get("status") or {}).get("message")
        for o in objs
        if (o.get("status") or {}).get("phase") != "Succeeded"
    }
    assert not failed, f"not Succeeded: {failed}\noperator log (tail):\n{tail(log)}"
    for obj in objs:  # what each run published is on the shared volume
        status = obj["status"]
        for uri in [status.get("loraURI"), status.get("datasetURI"), status.get("contactSheetURI")]:
            found = local_artifact(root, uri)
            assert found is None or Path(found).exists(), f"{obj['kind']}/{obj['metadata']['name']}: no {uri}"

    assert who["username"] == account, who
    assert who["extra"]["authentication.kubernetes.io/pod-name"] == [pod["metadata"]["name"]], who
    if environment is not None:
        assert "KUBECONFIG" not in environment
        assert environment[ROOTFS_ENV] == str(rootfs)
    assert not refusals, "the API server refused the operator under the chart's RBAC:\n" + "\n".join(refusals)
    assert "Forbidden" not in log.read_text(encoding="utf-8", errors="replace")
    assert not unanswered, "dashboard queries without data on the run:\n" + "\n".join(unanswered)

    _, version = cluster.api("GET", "/version")
    line = real_e2e.summary_line(version["gitVersion"], objs, who["username"])
    with capsys.disabled():
        print(
            f"\n{line}\n  (setup and operator pod {installed - started:.1f}s, examples {settled - installed:.1f}s, "
            f"total {time.monotonic() - started:.1f}s)\n  {scraped.summary()}"
        )
    if os.environ.get(SUMMARY_ENV):
        Path(os.environ[SUMMARY_ENV]).write_text(line + "\n", encoding="utf-8")


def tail(path: Path, lines: int = 30, width: int = 400) -> str:
    """The log's last lines, each cut to `width` characters (a JSON record may carry a whole traceback)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({exc})"
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


def test_the_summary_line_counts_what_succeeded_by_kind() -> None:
    objs = [
        {"kind": "StyleBoard", "status": {"phase": "Succeeded"}},
        {"kind": "StyleLoRA", "status": {"phase": "Succeeded"}},
        {"kind": "StyleLoRA", "status": {"phase": "Failed"}},
        {"kind": "LoRAFusion"},
    ]
    assert real_e2e.summary_line("v1.37.2", objs, "system:serviceaccount:kleinstyle-system:kleinstyle") == (
        "e2e: Kubernetes v1.37.2, 2/4 resources Succeeded (StyleBoard 1, StyleLoRA 1, GenerationJob 0, LoRAFusion 0), "
        "operator ran as system:serviceaccount:kleinstyle-system:kleinstyle"
    )
