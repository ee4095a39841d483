"""The images `make images` built, run as a cluster runs them: examples/ on the real control plane with the chart's
operator from the operator image and every Job from the runtime image, each container under its pod's security
context (non-root, read-only root filesystem, no capabilities; devcluster/containers.py), with podman.

test_examples.py runs the same world with each pod as a local process of this checkout; here nothing of the checkout
runs in a pod: what the operator reconciles with and what the Jobs compute with is what the images hold. Skipped,
saying why, where podman or the images are not on this machine (`make images` builds them).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster import containers, real_e2e
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.demo import NAMESPACE, local_artifact
from kleinstyle.devcluster.node_agent import NodeAgent

from .conftest import CHART, CRDS, RELEASE, REPO, started_cluster
from .rbac import bind, ensure_namespace, install_chart, user, wait_for
from .test_examples import apply_examples_until_settled, operator_pod, tail

REGISTRY = "ghcr.io/kleinstyle"  # hack/images/build.sh's default, the chart's


def version() -> str:
    import tomllib

    with (REPO / "pyproject.toml").open("rb") as handle:
        found: str = tomllib.load(handle)["project"]["version"]
    return found


OPERATOR_IMAGE = f"{REGISTRY}/operator:{version()}"
RUNTIME_IMAGE = f"{REGISTRY}/runtime:{version()}"


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    if containers.podman() is None:
        pytest.skip("no podman on this machine: the image tests need it (apt-get install podman buildah debootstrap)")
    missing = [image for image in (OPERATOR_IMAGE, RUNTIME_IMAGE) if not containers.image_present(image)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not built here: `make images` builds them")
    return OPERATOR_IMAGE, RUNTIME_IMAGE


@pytest.fixture(scope="module")
def cluster(images: tuple[str, str]) -> Iterator[RealCluster]:
    """A control plane of its own: the chart is cluster-wide and the node agent registers the chart's nodes."""
    yield from started_cluster(helm=True)


def container_of(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def podman_inspect(name: str) -> dict[str, Any] | None:
    found = subprocess.run(
        ["podman", "container", "inspect", name],
        env=containers.podman_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(found.stdout)[0] if found.returncode == 0 else None


def test_examples_succeed_with_every_pod_run_from_the_images(
    cluster: RealCluster, images: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_image, runtime_image = images
    root = tmp_path / "node"
    values = real_e2e.chart_values(root)
    repository, tag = operator_image.rsplit(":", 1)
    values["image"] = {"repository": repository, "tag": tag, "pullPolicy": "Never"}
    values["config"] = {**values["config"], "runtimeImage": runtime_image, "imagePullPolicy": "Never"}
    real_e2e.lay_out_volumes(root)
    # As the chart's models-pull Job (and a board's upload) would leave them: written by the images' user, 1000.
    for path in [root / "volumes", *(root / "volumes").rglob("*")]:
        os.chown(path, 1000, 1000, follow_symlinks=False)
    namespace = ensure_namespace(cluster, NAMESPACE)
    real_e2e.bind_claims(cluster, namespace, root)
    with NodeAgent(cluster, root, images=images) as agent:
        release = install_chart(
            cluster, CHART, values, tmp_path / "helm", name=RELEASE, namespace=real_e2e.RELEASE_NAMESPACE
        )
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
        bind(cluster, namespace, "edit", "alice")
        tenant = user(cluster, "alice", namespace, tmp_path)
        wait_for("alice may create StyleBoards", lambda: tenant.can_i("create", "StyleBoard", namespace))
        pod = wait_for("the operator's pod Running", lambda: operator_pod(cluster, release.namespace), timeout=90)
        log = agent.log_path(pod)
        run = agent.pod_run(pod["metadata"]["namespace"], pod["metadata"]["name"])
        assert run is not None
        inspected = podman_inspect(run.container_name)  # the operator's container, as podman runs it
        objs = apply_examples_until_settled(cluster, tenant, namespace, pod, log)
        _, job_pods = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods")

    failed = {
        f"{o['kind']}/{o['metadata']['name']}": (o.get("status") or {}).get("message")
        for o in objs
        if (o.get("status") or {}).get("phase") != "Succeeded"
    }
    assert not failed, f"not Succeeded: {failed}\noperator log (tail):\n{tail(log)}"
    for obj in objs:  # what each run published is on the shared volume, written by the runtime image's user
        status = obj["status"]
        for uri in [status.get("loraURI"), status.get("datasetURI"), status.get("contactSheetURI")]:
            found = local_artifact(root, uri)
            if found is not None:
                assert Path(found).exists(), f"{obj['kind']}/{obj['metadata']['name']}: no {uri}"
                assert Path(found).stat().st_uid == 1000, f"{found} was not written by the image's user"

    # The operator ran in its image, as the chart's user, on a read-only root with no capabilities.
    assert inspected is not None, "the operator's container was not found in podman"
    assert inspected["ImageName"] == operator_image
    assert inspected["Config"]["User"] == "1000:1000"
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert inspected["EffectiveCaps"] in (None, [])
    # Every Job's pod ran the runtime image to completion.
    ran = {p["metadata"]["name"]: container_of(p) for p in job_pods.get("items") or []}
    assert ran, "no Job pods"
    for name, container in ran.items():
        assert container["image"] == runtime_image, name
        assert container["state"]["terminated"]["exitCode"] == 0, (name, container)
    steps = {p["spec"]["containers"][0]["name"] for p in job_pods["items"]}
    assert {"prepare", "fuse"} <= steps, steps
    with capsys.disabled():
        print(f"\nimages: {len(objs)} resources Succeeded; {len(ran)} Job pods ({', '.join(sorted(steps))}) ran")
