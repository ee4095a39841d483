"""The operator at scale on the embedded cluster: API requests, time to every Job, steady load, memory.

N resources (half StyleBoards, half StyleLoRAs on them) across M namespaces are applied to the API emulator; the
operator runs as its own process (`kleinstyle operator`, cluster-wide, as the chart installs it), so its requests
and its peak RSS are its own. No Job ever runs: the harness plays the prepare pods of the boards (it marks each
board's Job complete and writes the pod's report, as the kubelet and the runtime would), so every StyleLoRA gets
its training Job, and those stay queued for good, as behind a Kueue quota that never frees.

Reported:
- seconds_to_all_jobs: from the first apply until every resource has its Job;
- requests_per_resource: the operator's API requests until then, plus a settling period, per resource;
- floor_per_resource: the requests a resource needs at the least (its 5 creates, its status patches, and for a
  finished board the 3 deletes that take its run's rights away), averaged over boards and LoRAs;
- steady_requests_per_second: the operator's requests per second once everything waits;
- peak_rss_mib: the operator process's peak resident memory (VmHWM).

    python bench/operator_scale.py [--resources 500] [--namespaces 50] [--steady 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from kleinstyle.contract.reports import AcceptedImage, PrepareReport, PrepareResult
from kleinstyle.devcluster import DevCluster, KubeClient, admission
from kleinstyle.operator import crdgen

GROUP = "kleinstyle.dev/v1alpha1"
# Per resource at the least: 5 creates (ServiceAccount, Role, RoleBinding, ConfigMap, Job), a status patch per
# phase it reaches (board: Pending, Succeeded; LoRA: Waiting, Pending), and for the finished board 3 deletes.
FLOOR = {"StyleBoard": 5 + 2 + 3, "StyleLoRA": 5 + 2}


class CountingClient(KubeClient):
    """The harness's own client: its requests are counted, so the operator's are the rest of the log."""

    count = 0
    made: Counter[tuple[str, str]] = Counter()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.count += 1
        self.made[kind_of(method, path, kwargs.get("params") or {})] += 1
        return await super().request(method, path, **kwargs)


def kind_of(method: str, path: str, params: dict[str, str]) -> tuple[str, str]:
    """(verb, resource) of a request, for the breakdown: GET splits into get, list and watch."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    resource = "/".join([rest[0], *rest[2:]]) if rest else "?"
    verb = method.lower()
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else "get" if len(rest) > 1 else "list"
    return verb, resource


def resources(total: int, namespaces: int) -> list[dict[str, Any]]:
    docs = []
    for index in range(total // 2):
        namespace = f"team-{index % namespaces:03d}"
        board = f"board-{index:04d}"
        docs.append(
            {
                "apiVersion": GROUP,
                "kind": "StyleBoard",
                "metadata": {"name": board, "namespace": namespace},
                "spec": {
                    "triggerWord": "benchstyle",
                    "images": [{"source": f"https://refs.example/{board}/{i}.png", "caption": "a"} for i in (1, 2)],
                    "captioning": {"provider": "none"},
                },
            }
        )
        docs.append(
            {
                "apiVersion": GROUP,
                "kind": "StyleLoRA",
                "metadata": {"name": f"lora-{index:04d}", "namespace": namespace},
                "spec": {"boardRef": {"name": board}, "backend": "builtin"},
            }
        )
    return docs


def prepared(run_hash: str) -> dict[str, Any]:
    """The report a prepare pod writes: six images accepted."""
    accepted = [
        AcceptedImage(source=f"s{i}", file=f"{i:03d}.png", width=512, height=512, sha256="0" * 64, caption="x")
        for i in range(6)
    ]
    result = PrepareResult(succeeded=True, message="prepared 6 images", accepted=accepted)
    return {"status": {"progress": PrepareReport(runHash=run_hash, state="Succeeded", result=result).model_dump()}}


async def play_prepare_pods(client: KubeClient, done: set[str]) -> None:
    """Complete every board's prepare Job not yet completed: the Job's status and the pod's report."""
    for job in await client.list("jobs", label_selector="kleinstyle.dev/step=prepare"):
        meta = job["metadata"]
        if meta["uid"] in done:
            continue
        owner = next(ref for ref in meta["ownerReferences"] if ref.get("controller"))
        run_hash = meta["labels"]["kleinstyle.dev/run-hash"]
        await client.patch("styleboards", meta["namespace"], owner["name"], prepared(run_hash), subresource="status")
        status = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
        await client.patch("jobs", meta["namespace"], meta["name"], status, subresource="status")
        done.add(meta["uid"])


def start_operator(cluster: DevCluster, folder: Path) -> subprocess.Popen[bytes]:
    config = folder / "operator.yaml"
    config.write_text(yaml.safe_dump({"metricsPort": 0, "defaultBackend": "builtin"}))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}
    command = [sys.executable, "-m", "kleinstyle.cli.main", "operator", "--config", str(config)]
    command += ["--liveness", "http://127.0.0.1:0/healthz"]
    log = (folder / "operator.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(total: int, namespaces: int, steady_s: float, settle_s: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="kleinstyle-scale-"))
    crds = list(crdgen.build_crds().values())
    async with DevCluster(folder, crds=crds, admit=admission.admit, run_jobs=False) as cluster:
        client = CountingClient(cluster.url, cluster.emulator.kinds)
        operator = start_operator(cluster, folder)
        try:
            docs = resources(total, namespaces)
            started = time.monotonic()
            for doc in docs:
                await client.create(doc["kind"].lower() + "s", doc, doc["metadata"]["namespace"])
            done: set[str] = set()
            while True:
                await play_prepare_pods(client, done)
                jobs = len(await client.list("jobs"))
                if jobs >= total:
                    break
                if operator.poll() is not None:
                    raise RuntimeError(f"the operator exited ({operator.returncode}); see {folder}/operator.log")
                await asyncio.sleep(0.5)
            seconds_to_all_jobs = time.monotonic() - started
            await asyncio.sleep(settle_s)
            before_steady = len(cluster.emulator.requests()) - client.count
            await asyncio.sleep(steady_s)
            after_steady = len(cluster.emulator.requests()) - client.count
            rss = peak_rss_mib(operator.pid)
            everything = Counter(kind_of(r.method, r.path, r.params) for r in cluster.emulator.requests())
            breakdown = everything - client.made
        finally:
            operator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                operator.wait(timeout=30)
            if operator.poll() is None:
                operator.kill()
            await client.close()
    boards = loras = total // 2
    return {
        "resources": total,
        "namespaces": namespaces,
        "seconds_to_all_jobs": round(seconds_to_all_jobs, 1),
        "requests_per_resource": round(before_steady / total, 1),
        "floor_per_resource": round((FLOOR["StyleBoard"] * boards + FLOOR["StyleLoRA"] * loras) / total, 1),
        "steady_requests_per_second": round((after_steady - before_steady) / steady_s, 2),
        "peak_rss_mib": round(rss, 1),
        "settle_seconds": settle_s,
        "steady_seconds": steady_s,
        "operator_requests": {f"{verb} {resource}": n for (verb, resource), n in breakdown.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resources", type=int, default=500, help="StyleBoards and StyleLoRAs, half each")
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds waited after the last Job appears")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    row = asyncio.run(measure(args.resources, args.namespaces, args.steady, args.settle))
    if args.json:
        print(json.dumps(row))
        return
    print("| resources | namespaces | s to all Jobs | requests/resource | floor | steady req/s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {row['resources']} | {row['namespaces']} | {row['seconds_to_all_jobs']} | {row['requests_per_resource']} "
        f"| {row['floor_per_resource']} | {row['steady_requests_per_second']} | {row['peak_rss_mib']} |"
    )
    print("\nthe operator's requests, whole run:", ", ".join(f"{n} {k}" for k, n in row["operator_requests"].items()))


if __name__ == "__main__":
    main()
