"""The operator's metrics as Prometheus reads them: scraped over HTTP after an end-to-end run on the embedded
cluster and parsed with prometheus_client's text parser (the exposition format Prometheus parses)."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for, dev_config, write_model_cache
from prometheus_client.parser import text_string_to_metric_families

from .test_operator_e2e import BOARD, GENERATION, LORA, NS, phase_is

pytestmark = pytest.mark.emulator

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
    """{family name: [(sample name, labels, value)]} from the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    family = re.sub(r"(_total|_count|_sum|_bucket)$", "", sample)
    found = [v for name, have, v in families.get(family, []) if name == sample and labels.items() <= have.items()]
    return sum(found)


def documented_metrics() -> set[str]:
    """The metric names the README's Metrics section lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Metrics") :]
    section = section[: section.index("\n## ")]
    # A counter's family is named without _total, as the parser (and Prometheus' metadata) name it.
    return {re.sub(r"_total$", "", name) for name in re.findall(r"`(kleinstyle_[a-z_]+)`", section)}


async def test_after_a_run_the_metrics_say_what_each_namespace_used(root: Path):
    write_model_cache(root)
    port = free_port()
    config = dev_config(root).model_copy(update={"metrics_port": port})
    async with cluster_for(root, NS, config=config) as cluster:
        await cluster.apply([GENERATION, BOARD, LORA])
        # The registry is this process's: other tests count into it too, so compare with a scrape before.
        await cluster.wait_for(phase_is(cluster, "styleboards", "bd9", "Pending", "Running", "Succeeded"), timeout=30)
        before = scrape(port)
        done = await cluster.wait_for(phase_is(cluster, "generationjobs", "bd9-samples", "Succeeded"), timeout=180)
        lora = await cluster.get("styleloras", NS, "bd9-lora")
        after = scrape(port)

    def grew(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    for kind in ("StyleLoRA", "GenerationJob"):  # GPU work: counted per namespace, kind and node pool
        assert grew("kleinstyle_gpu_seconds_total", namespace=NS, kind=kind, node_pool="h200") > 0, kind
        assert grew("kleinstyle_runs_total", namespace=NS, kind=kind, outcome="Succeeded") == 1, kind
        assert grew("kleinstyle_queue_wait_seconds_count", namespace=NS, kind=kind) == 1, kind
    assert grew("kleinstyle_gpu_seconds_total", kind="StyleBoard") == 0  # preparing a board takes no GPU
    assert grew("kleinstyle_run_duration_seconds_count", kind="StyleLoRA", outcome="Succeeded") == 1
    scored = [c for c in lora["status"]["checkpoints"] if c.get("score") is not None]
    assert grew("kleinstyle_checkpoints_scored_total", namespace=NS) == len(scored) > 0
    assert grew("kleinstyle_images_rendered_total", namespace=NS) == done["status"]["imagesDone"] == 2
    assert value(after, "kleinstyle_resource_phase", namespace=NS, name="bd9-samples", phase="Succeeded") == 1
    assert value(after, "kleinstyle_reconciles_total", outcome="ok") > 0
    # Every metric the README documents is exposed (with or without samples yet), and nothing undocumented.
    exposed = {name for name in after if name.startswith("kleinstyle_")}
    assert documented_metrics() == exposed
