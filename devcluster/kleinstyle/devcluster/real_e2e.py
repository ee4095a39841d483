"""examples/ end to end on the real control plane: the demo's world (demo.py) with nothing emulated but the kubelet.

The API server, scheduler, Job and Deployment controllers are the real ones (controlplane.py), the node agent
(node_agent.py) is the kubelet, and the operator is the chart's Deployment, run by the node agent as a pod with the
projected token of the chart's ServiceAccount as its only credential. What a run needs besides the chart is what the
demo lays out: the reference images and the tiny klein in their claims' folders, the claims themselves (static
PersistentVolumes, as one RWX filesystem behind every namespace's claim would be), and the demo's operator
configuration as the chart's values. tests/cluster/test_examples.py drives it; `summary_line` is what it reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kleinstyle.operator.api import API_VERSION, KINDS

from .controlplane import KUBE_VERSION, RealCluster, find_bin_dir, free_port
from .demo import REFERENCE_CLAIM, dev_config, settled, write_model_cache
from .node_agent import NodeAgent
from .references import write_references

RELEASE, RELEASE_NAMESPACE = "kleinstyle", "kleinstyle-system"
REPO = Path(__file__).resolve().parents[3]  # a checkout: the dev cluster is a development tool, never a wheel
CHART = REPO / "charts" / "kleinstyle"
# The operator image's ENTRYPOINT (images/operator.Containerfile): the chart's container gives only its args.
OPERATOR_ENTRYPOINT = ("kleinstyle",)
# Each Job gets one core of the machine (its thread pools follow its CPU limit): on 2 cores the two trainings, then
# the generation and the fusion, run side by side as they do in the emulator's executor (cores // parallelism).
JOB_CPU = "1"
# Keys of the demo's OperatorConfig (demo.dev_config) that become the chart's config values: what makes the runs
# take seconds on a CPU (the builtin backend, the caps, the small probes), a quick resync and no metrics port.
DEMO_CONFIG_KEYS = (
    "runtimeImage",
    "defaultBackend",
    "resyncSeconds",
    "metricsPort",
    "trainingLimits",
    "checkpointEvaluation",
    "generationLimits",
)


def claim_names(root: Path) -> tuple[str, ...]:
    """The claims a run of examples/ mounts: the artifacts, the model cache and the board's references."""
    cfg = dev_config(root)
    return (cfg.artifacts.claim_name, cfg.model_cache_claim, REFERENCE_CLAIM)


def lay_out_volumes(root: Path) -> None:
    """The files behind the claims, where the node agent keeps a claim (ROOT/volumes/CLAIM), as the demo writes them:
    the board's reference images and the tiny klein in the model cache."""
    write_references(root / "volumes" / REFERENCE_CLAIM / "bd9")
    write_model_cache(root)


def static_claim(namespace: str, name: str) -> list[dict[str, Any]]:
    """A PersistentVolume reserved for the claim `name` in `namespace`, and the claim naming it: bound at once by the
    PV controller, with no provisioner (the scheduler places no pod whose claim is unbound). The node agent keeps
    a claim's files by claim name, so every namespace's claim of one name reaches one folder, as static PVs on one
    RWX filesystem do."""
    volume = f"{namespace}-{name}"
    spec = {"accessModes": ["ReadWriteMany"], "storageClassName": ""}
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                **spec,
                "capacity": {"storage": "10Gi"},
                "hostPath": {"path": f"/unused/{volume}"},  # never read: the agent keeps a claim's files itself
                "claimRef": {"namespace": namespace, "name": name},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {**spec, "volumeName": volume, "resources": {"requests": {"storage": "10Gi"}}},
        },
    ]


def bind_claims(cluster: RealCluster, namespace: str, root: Path) -> None:
    """Every claim a run of examples/ mounts (`claim_names`), created Bound in `namespace` (`static_claim`)."""
    for claim in claim_names(root):
        for obj in static_claim(namespace, claim):
            plural = "persistentvolumes" if obj["kind"] == "PersistentVolume" else "persistentvolumeclaims"
            scope = f"/namespaces/{namespace}" if obj["kind"] == "PersistentVolumeClaim" else ""
            status, body = cluster.api("POST", f"/api/v1{scope}/{plural}", obj)
            if status != 201:
                raise RuntimeError(f"creating {obj['kind']} {obj['metadata']['name']}: {status} {body}")


def chart_values(root: Path) -> dict[str, Any]:
    """The chart's values for the demo's configuration: the operator's config from demo.dev_config (its wire
    spelling), one core per Job, the log at DEBUG so every response status is in it, an image that is never pulled."""
    cfg = dev_config(root)
    wire = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    config = {key: wire[key] for key in DEMO_CONFIG_KEYS}
    config["cpuResources"] = {**wire["cpuResources"], "cpu": JOB_CPU}
    config["gpuResources"] = {**wire["gpuResources"], "cpu": JOB_CPU}
    return {
        "image": {"repository": "kleinstyle/operator", "tag": "local"},
        "logLevel": "DEBUG",
        # Every pod of the node agent shares this machine's ports: two operators (two tests) must not share one.
        "livenessPort": free_port(),
        "config": config,
    }


def resources(cluster: RealCluster, namespace: str) -> list[dict[str, Any]]:
    """Every kleinstyle object in `namespace`, kind by kind (KINDS' order), with its kind (lists leave it out)."""
    found = []
    for kind in KINDS:
        status, listed = cluster.api("GET", f"/apis/{API_VERSION}/namespaces/{namespace}/{kind.plural}")
        if status != 200:
            raise RuntimeError(f"listing {kind.plural} in {namespace}: {status} {listed}")
        found += [{"kind": kind.kind, **item} for item in listed.get("items") or []]
    return found


def _line(elapsed: float, obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    return f"[{elapsed:5.1f}s] {name:<26} {status.get('phase') or '-':<10} {status.get('message') or ''}"


def wait_until_settled(
    cluster: RealCluster,
    namespace: str,
    expected: int,
    timeout: float,
    *,
    stalled: float = 60.0,
    echo: Callable[[str], None] = print,
    check: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Poll until the `expected` resources are settled (demo.settled: each finished or waits on another for its
    current generation) and none waits any more, echoing each change of phase or message; return them. A resource
    that Failed ends the wait at once: nothing will change it. So does a TimeoutError after `timeout` seconds, or
    after `stalled` seconds in which no status changed (an operator that cannot reach the API changes none; a
    training step's progress changes one every few seconds). `check` runs before each poll and raises to end the
    wait early (the operator's pod gone or restarting)."""
    start = last_change = time.monotonic()
    seen: dict[str, tuple[Any, ...]] = {}
    while True:
        check()
        objs = resources(cluster, namespace)
        now = time.monotonic()
        for obj in objs:
            status = obj.get("status") or {}
            key = f"{obj['kind']}/{obj['metadata']['name']}"
            value = (status.get("phase"), status.get("message"), status.get("progressText"))
            if value[0] and seen.get(key) != value:
                if seen.get(key, (None, None))[:2] != value[:2]:
                    echo(_line(now - start, obj))
                seen[key], last_change = value, now
        phases = [(obj.get("status") or {}).get("phase") for obj in objs]
        if len(objs) == expected and settled(objs) and ("Waiting" not in phases or "Failed" in phases):
            return objs
        if now - start > timeout or now - last_change > stalled:
            last = ", ".join(f"{key} {value[0]}" for key, value in sorted(seen.items())) or "no status at all"
            raise TimeoutError(
                f"the resources did not settle within {timeout:.0f}s, or nothing changed for {stalled:.0f}s: {last}"
            )
        time.sleep(0.5)


def summary_line(version: str, objs: list[dict[str, Any]], operator: str) -> str:
    """`e2e: Kubernetes VERSION, N/N resources Succeeded (StyleBoard a, ...), operator ran as USER`: the one line
    `make e2e` shows of the run."""
    succeeded = Counter(obj["kind"] for obj in objs if (obj.get("status") or {}).get("phase") == "Succeeded")
    kinds = ", ".join(f"{kind.kind} {succeeded[kind.kind]}" for kind in KINDS)
    return (
        f"e2e: Kubernetes {version}, {sum(succeeded.values())}/{len(objs)} resources Succeeded ({kinds}), "
        f"operator ran as {operator}"
    )


def helm_env(home: Path) -> dict[str, str]:
    """helm's caches, config and data in `home`, never the user's own (no repositories, no plugins)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HELM_", "KUBE"))}
    for name in ("CACHE", "CONFIG", "DATA"):
        folder = home / name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[f"HELM_{name}_HOME"] = str(folder)
    return env


def helm(cluster: RealCluster, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The built helm against `cluster` as its admin; raises with helm's own words when it fails."""
    command = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def serve(root: str, namespace: str, apply: list[str]) -> int:
    """`kleinstyle dev-cluster --real`: the real control plane, the node agent, the chart installed by helm with the
    demo's configuration and the demo's volumes, `apply` applied in `namespace`; until Ctrl-C."""
    bin_dir = find_bin_dir()
    if bin_dir is None or not (bin_dir / "helm").is_file():
        print("no real control plane: `make controlplane` builds it once (docs/real-cluster.md)")
        return 2
    folder = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with RealCluster(bin_dir) as cluster, NodeAgent(cluster, folder, entrypoint=OPERATOR_ENTRYPOINT):
        lay_out_volumes(folder)
        cluster.kubectl("create", "namespace", namespace)
        bind_claims(cluster, namespace, folder)
        values = folder / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values(folder), sort_keys=False), encoding="utf-8")
        env = helm_env(folder / "helm")
        helm(
            cluster,
            env,
            "install",
            RELEASE,
            str(CHART),
            "-n",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            str(values),
        )
        for path in apply:
            cluster.kubectl("apply", "-n", namespace, "-f", path)
        kubeconfig = folder / "kubeconfig"
        shutil.copyfile(cluster.kubeconfig, kubeconfig)
        print(f"Kubernetes {KUBE_VERSION} at {cluster.server}, the chart's operator in {RELEASE_NAMESPACE}")
        print(f"  export KUBECONFIG={kubeconfig}; kubectl get kleinstyle -n {namespace} -w   (Ctrl-C stops it)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
