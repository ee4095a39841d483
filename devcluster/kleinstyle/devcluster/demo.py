"""`kleinstyle demo` and `kleinstyle dev-cluster`: the operator, for real, on the embedded cluster.

The demo applies examples/ and prints each resource's status as it moves, then where every artifact is. Steps the
runtime has show their real result; steps it lacks show as Pending with the reason, never as a faked success.
The StyleLoRA trains for real with the builtin backend on a tiny random klein written into the model-cache volume,
held to a few steps at low resolution by the operator's trainingLimits so it finishes in seconds on a CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import time
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from kleinstyle.contract.pod import PROVIDER_KEY_ENV, PROVIDER_URL_ENV
from kleinstyle.operator import crdgen, logs, metrics
from kleinstyle.operator.api import GROUP, KINDS
from kleinstyle.operator.config import (
    ArtifactStore,
    CheckpointEvaluation,
    GenerationLimits,
    OperatorConfig,
    TrainingLimits,
)
from kleinstyle.operator.main import run_operator
from kleinstyle.runtime.klein.tiny_evaluators import CONTENT_DIR, STYLE_DIR, TEXT_DIR
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import admission
from .cluster import DevCluster
from .kueue import WORKLOAD_CRD
from .references import write_references
from .wiring import configure_kopf_for_emulator

NAMESPACE = "kleinstyle-demo"
ARTIFACT_CLAIM = "kleinstyle-artifacts"
REFERENCE_CLAIM = "kleinstyle-references"
DEMO_MAX_STEPS = 30
DEMO_MAX_RESOLUTION = 128
DEMO_MAX_SIDE = 128
DEMO_MAX_GENERATION_STEPS = 8
EVALUATORS = "evaluators"  # where the model cache keeps the (tiny) evaluation models
# Shown before the examples: a StyleLoRA the schema refuses, as `kubectl apply` would.
BAD_LORA = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleLoRA",
    "metadata": {"name": "too-wide"},
    "spec": {"boardRef": {"name": "bd9"}, "training": {"rank": 48, "learningRate": 0}},
}


def dev_config(root: Path) -> OperatorConfig:
    """The operator's configuration on the embedded cluster: quick resyncs, no metrics port, local artifacts, and
    the text providers' endpoint overrides of this process's environment (a proxy, a test server)."""
    urls = {name: os.environ[env] for name, env in PROVIDER_URL_ENV.items() if os.environ.get(env)}
    return OperatorConfig(
        text_provider_urls=urls,
        runtime_image="local",
        default_backend="builtin",
        resync_seconds=5.0,
        metrics_port=0,
        artifacts=ArtifactStore(claim_name=ARTIFACT_CLAIM),
        artifacts_local_path=str(root / "volumes" / ARTIFACT_CLAIM),
        # The tiny model on a CPU: a handful of steps at low resolution train in seconds.
        training_limits=TrainingLimits(max_steps=DEMO_MAX_STEPS, max_resolution=DEMO_MAX_RESOLUTION),
        # Early stopping scores each checkpoint with two 32 px probes of two steps: a fraction of a second here, by
        # tiny random evaluation models in the model cache (write_model_cache): the real-model code, no proxy.
        checkpoint_evaluation=CheckpointEvaluation(
            prompts=2,
            seeds=1,
            size=32,
            steps=2,
            style_embedder_dir=f"{EVALUATORS}/{STYLE_DIR}",
            text_model_dir=f"{EVALUATORS}/{TEXT_DIR}",
            embedder_dir=f"{EVALUATORS}/{CONTENT_DIR}",
        ),
        # ... and renders a few steps at the same size: a GenerationJob's 2048x2048 at 50 steps becomes seconds.
        generation_limits=GenerationLimits(max_side=DEMO_MAX_SIDE, max_steps=DEMO_MAX_GENERATION_STEPS),
    )


def write_model_cache(root: Path, model: str = "klein-base-9b") -> Path:
    """The tiny random klein where the embedded cluster's model-cache volume keeps `model`, and the tiny evaluation
    models beside it (each kept if present)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" would open the demo's output
    cfg = dev_config(root)
    cache = root / "volumes" / cfg.model_cache_claim
    target = cache / cfg.model_dirs[model]
    if not (target / "model_index.json").is_file():
        from kleinstyle.runtime.klein.tiny import write_tiny_klein

        write_tiny_klein(target)
    if not (cache / EVALUATORS / CONTENT_DIR / "config.json").is_file():
        from kleinstyle.runtime.klein.tiny_evaluators import write_tiny_evaluators

        write_tiny_evaluators(cache / EVALUATORS)
    return target


def cluster_for(
    root: Path,
    namespace: str,
    *,
    config: OperatorConfig | None = None,
    kueue: bool = False,
    **operator_args: Any,
) -> DevCluster:
    """The embedded cluster with the CRDs, offline admission and the operator (`config`, default `dev_config`;
    `operator_args` go to it); with Kueue's Workload API when `kueue` (drive it with `FakeKueue`)."""
    operator = partial(embedded_operator, config or dev_config(root), namespace, **operator_args)
    crds = [*crdgen.build_crds().values(), *([WORKLOAD_CRD] if kueue else [])]
    return DevCluster(root, crds=crds, admit=_admit_ours, operator=operator, namespace=namespace)


def _admit_ours(obj: dict[str, Any]) -> dict[str, Any]:
    """kleinstyle's admission for its own kinds; other custom kinds (Kueue's) are stored as sent."""
    if str(obj.get("apiVersion", "")).startswith(f"{GROUP}/"):
        return admission.admit(obj)
    return obj


async def embedded_operator(cfg: OperatorConfig, namespace: str, stop: asyncio.Event, **kwargs: Any) -> None:
    await run_operator(cfg, [namespace], stop_flag=stop, tune=configure_kopf_for_emulator, **kwargs)


def log_to(root: Path) -> None:
    """The operator's log goes to a file: the terminal shows the resources' story."""
    root.mkdir(parents=True, exist_ok=True)
    # The operator's own text format: each line about a resource names it (namespace/Kind/name).
    logs.setup("INFO", "text", (root / "operator.log").open("a", encoding="utf-8"))


def load_documents(paths: Iterable[str]) -> list[dict[str, Any]]:
    """YAML documents from files or folders (sorted), read as kubectl reads numbers such as 1e-4."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        files += sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    return [doc for file in files for doc in admission.load_manifests(file.read_text()) if doc]


def local_artifact(root: Path, uri: str | None) -> str | None:
    """pvc://CLAIM/PATH as the folder the embedded cluster keeps that claim in."""
    if not uri or not uri.startswith("pvc://"):
        return uri
    claim, _, rest = uri[len("pvc://") :].partition("/")
    return str(root / "volumes" / claim / rest)


def _reason(obj: dict[str, Any]) -> str:
    ready = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
    return ready["reason"] if ready else ""


def settled(objs: list[dict[str, Any]]) -> bool:
    """Nothing more will happen: every resource, for its current generation, finished or waits on another."""

    def done(obj: dict[str, Any]) -> bool:
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"].get("generation"):
            return False
        return status.get("phase") in ("Succeeded", "Failed", "Waiting")

    return bool(objs) and all(done(o) for o in objs)


async def _all(cluster: DevCluster, namespace: str) -> list[dict[str, Any]]:
    return [obj for kind in KINDS for obj in await cluster.list(kind.plural, namespace)]


def _line(elapsed: float, obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    progress = (
        f"  [{status['progressText']}]" if status.get("progressText") and status.get("phase") == "Running" else ""
    )
    return f"[{elapsed:5.1f}s] {name:<26} {status.get('phase') or '-':<10} {status.get('message') or ''}{progress}"


async def watch(cluster: DevCluster, namespace: str, timeout: float, quiet: float = 2.0) -> list[dict[str, Any]]:
    """Print a line whenever a resource's phase or message changes; return the objects once they are settled
    and nothing changed for `quiet` seconds (a Waiting resource may still move when its dependency finishes)."""
    start = last_change = time.monotonic()
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    while True:
        objs = await _all(cluster, namespace)
        now = time.monotonic()
        for obj in objs:
            status = obj.get("status") or {}
            key = (obj["kind"], obj["metadata"]["name"])
            value = (status.get("phase"), status.get("message"), status.get("progressText"))
            if value[0] and seen.get(key) != value:  # from its first reconcile on
                seen[key], last_change = value, now
                print(_line(now - start, obj), flush=True)
        if settled(objs) and now - last_change >= quiet:
            return objs
        if now - start > timeout:
            raise TimeoutError(f"the resources did not settle within {timeout:.0f}s")
        await asyncio.sleep(0.3)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


def report(root: Path, objs: list[dict[str, Any]]) -> int:
    """Print each resource's outcome and artifacts; 0 when every step that exists succeeded."""
    print("\nWhere things are:")
    failed = False
    for obj in objs:
        status = obj.get("status") or {}
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        phase = status.get("phase")
        failed |= phase == "Failed"
        print(f"  {name}: {phase} ({_reason(obj)})")
        if obj["kind"] == "StyleBoard" and phase == "Succeeded":
            print(f"    accepted {status.get('imagesAccepted')} images, rejected {status.get('imagesRejected')}:")
            for item in status.get("rejected", []):
                print(f"      - {item['source']}: {item['reason']}")
            dataset = local_artifact(root, status.get("datasetURI"))
            print(f"    dataset: {status.get('datasetURI')}\n      on this machine: {dataset}")
            if dataset and Path(dataset).is_dir():
                files = sorted(p.name for p in Path(dataset).iterdir())
                print(f"      files: {', '.join(files[:6])}{', ...' if len(files) > 6 else ''}")
            print_text_status(status)
        elif obj["kind"] == "StyleLoRA" and phase == "Succeeded":
            print(f"    {status.get('message')}")
            print(
                f"    trained {status.get('progressText')}, loss {_num(status.get('loss'))}, {status.get('stopReason')}"
            )
            print(f"    checkpoints (early stopping: {status.get('earlyStopping')}):")
            print(f"      step    0: the base model, score {_num(status.get('baseScore'))}")
            for item in status.get("checkpoints", []):
                best = "  <- best, the LoRA" if item["step"] == status.get("bestCheckpoint") else ""
                print(
                    f"      step {item['step']:>4}: loss {_num(item.get('loss'))}, score {_num(item.get('score'))}"
                    f"  {local_artifact(root, item['uri'])}{best}"
                )
            warning = next((c for c in status.get("conditions", []) if c["type"] == "Warning"), {})
            if warning.get("status") == "True":
                print(f"    warnings: {warning['message']}")
            if gallery := status.get("checkpointGalleryURI"):
                print(f"    checkpoint gallery: {gallery}\n      on this machine: {local_artifact(root, gallery)}")
            if status.get("loraURI"):
                lora = local_artifact(root, status.get("loraURI"))
                print(f"    LoRA: {status.get('loraURI')}\n      on this machine: {lora}")
            else:
                print("    LoRA: none, the base model beat every checkpoint (see the gallery)")
        elif obj["kind"] == "GenerationJob" and phase == "Succeeded":
            _report_generation(root, status)
        elif obj["kind"] == "LoRAFusion" and phase == "Succeeded":
            energy = status.get("energyKept")
            kept = f"{100 * energy:.2f}%" if isinstance(energy, int | float) else "-"
            print(
                f"    {obj['spec'].get('method')}: rank {status.get('rank')}, energy kept {kept}, "
                f"{_num(status.get('durationSeconds'))} s"
            )
            lora = local_artifact(root, status.get("loraURI"))
            print(f"    LoRA: {status.get('loraURI')}\n      on this machine: {lora}")
        elif phase in ("Pending", "Waiting", "Failed"):
            print(f"    {status.get('message')}")
        if status.get("artifactURI") and phase in ("Running", "Succeeded", "Failed"):
            print(f"    run artifacts: {local_artifact(root, status['artifactURI'])}")
    print(f"\nPod logs: {root / 'logs'}\nOperator log: {root / 'operator.log'}")
    return 1 if failed else 0


def print_text_status(status: Mapping[str, Any]) -> None:
    """The board's captions, STYLE_PROFILE and token usage, as the demo shows them."""
    print(f"    captions: {status.get('captioning')}")
    for item in status.get("captions", [])[:3]:
        note = f"  [{item['note']}]" if item.get("note") else ""
        print(f"      {item['file']} ({item['origin']}): {item['caption']}{note}")
    profile = status.get("styleProfile")
    if profile:
        print(f"    style profile from {', '.join(status.get('styleProfileImages', []))}:")
        print(f"      PROMPT_SUFFIX_MUST: {profile['PROMPT_SUFFIX_MUST']}")
    else:
        print("    style profile: none (it needs a captioning provider with an API key)")
    if usage := status.get("tokenUsage"):
        print(
            f"    tokens: {usage['totalTokens']} in {usage['calls']} calls to {usage['provider']} ({usage['model']}), "
            f"{usage['cachedCalls']} answers from the cache"
        )


def _report_generation(root: Path, status: dict[str, Any]) -> None:
    render = status.get("render") or {}
    size = f"{render.get('width')}x{render.get('height')}"
    print(f"    rendered {status.get('progressText')} at {size}, {render.get('steps')} steps")
    reformulated = sum(bool(p.get("reformulated")) for p in status.get("prompts", []))
    print(f"    text pipeline {render.get('textPipeline')}: {render.get('textPipelineReason')}")
    print(f"    prompts reformulated: {reformulated} of {len(status.get('prompts', []))}")
    warning = next((c for c in status.get("conditions", []) if c["type"] == "Warning" and c["status"] == "True"), None)
    if warning:
        print(f"    warnings: {warning['message']}")
    prompts = {p["index"]: p["promptUsed"] for p in status.get("prompts", [])}
    for image in status.get("images", []):
        took = f"{image['seconds']:.1f} s" if isinstance(image.get("seconds"), int | float) else "-"
        print(f"      {local_artifact(root, image['uri'])}  ({took}) {prompts.get(image['promptIndex'], '')}")
    print(f"    contact sheet: {local_artifact(root, status.get('contactSheetURI'))}")


async def demo(root: str, examples: str, timeout: float) -> int:
    root_path = Path(root).resolve()
    log_to(root_path)
    write_references(root_path / "volumes" / REFERENCE_CLAIM / "bd9")
    write_model_cache(root_path)
    docs = load_documents([examples])
    async with cluster_for(root_path, NAMESPACE) as cluster:
        print(f"embedded cluster at {cluster.url}, namespace {NAMESPACE}, files in {root_path}\n")
        await cluster.apply([_gemini_secret()])
        try:
            await cluster.apply([BAD_LORA])
            print("unexpected: the invalid StyleLoRA was accepted")
            return 1
        except Exception as refused:
            print(f"kubectl apply of an invalid StyleLoRA is refused:\n  {getattr(refused, 'message', refused)}\n")
        applied = await cluster.apply(with_available_provider(docs, os.environ))
        print("applied: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in applied) + "\n")
        objs = await watch(cluster, NAMESPACE, timeout)
        outcome = report(root_path, objs)
    print_gpu_usage(metrics.REGISTRY)
    return outcome


def gpu_usage(registry: CollectorRegistry) -> dict[str, dict[tuple[str, str], float]]:
    """{namespace: {(kind, node pool): GPU-seconds}} from the operator's metrics, read as Prometheus reads them."""
    usage: dict[str, dict[tuple[str, str], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == "kleinstyle_gpu_seconds_total":
                labels = sample.labels
                per_namespace = usage.setdefault(labels["namespace"], {})
                key = (labels["kind"], labels["node_pool"])
                per_namespace[key] = per_namespace.get(key, 0.0) + sample.value
    return usage


def print_gpu_usage(registry: CollectorRegistry) -> None:
    print("\nGPU time by namespace (kleinstyle_gpu_seconds_total; on this CPU machine the pods only claim a GPU):")
    for namespace, used in sorted(gpu_usage(registry).items()):
        parts = ", ".join(f"{kind} {seconds:.1f} on {pool}" for (kind, pool), seconds in sorted(used.items()))
        print(f"  {namespace}: {sum(used.values()):.1f} GPU-seconds ({parts})")


def _gemini_secret() -> dict[str, Any]:
    """The Secret examples/styleboard.yaml names; filled from GEMINI_API_KEY when set, otherwise empty."""
    data = {"GEMINI_API_KEY": os.environ["GEMINI_API_KEY"]} if os.environ.get("GEMINI_API_KEY") else {}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kleinstyle-gemini"}, "stringData": data}


def with_available_provider(docs: list[dict[str, Any]], env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The demo's documents, with StyleBoards switched to OpenRouter when only OPENROUTER_API_KEY is set (plus the
    Secret that holds it): with either key the demo captions for real; with none it keeps the shipped captions."""
    if env.get("GEMINI_API_KEY") or not env.get("OPENROUTER_API_KEY"):
        return docs
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kleinstyle-openrouter"},
        "stringData": {PROVIDER_KEY_ENV["openrouter"]: env["OPENROUTER_API_KEY"]},
    }
    out = [secret]
    for doc in docs:
        if doc.get("kind") == "StyleBoard":
            doc = copy.deepcopy(doc)
            captioning = doc["spec"].setdefault("captioning", {})
            captioning.update(
                provider="openrouter",
                apiKeySecret={"name": "kleinstyle-openrouter", "key": PROVIDER_KEY_ENV["openrouter"]},
            )
            captioning.pop("model", None)
        out.append(doc)
    return out


async def serve(root: str, namespace: str, apply: list[str]) -> int:
    """Run the embedded cluster until interrupted."""
    root_path = Path(root).resolve()
    log_to(root_path)
    write_references(root_path / "volumes" / REFERENCE_CLAIM / "bd9")
    write_model_cache(root_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with cluster_for(root_path, namespace) as cluster:
        await cluster.apply([_gemini_secret()])
        if apply:
            await cluster.apply(load_documents(apply))
        print(
            f"API emulator at {cluster.url}; namespace {namespace}\n"
            f"  export KUBECONFIG={cluster.kubeconfig_path}\n  volumes: {root_path / 'volumes'}\n"
            f"  pod logs: {root_path / 'logs'}\nCtrl-C stops it.",
            flush=True,
        )
        await stop.wait()
    return 0
