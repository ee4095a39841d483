"""Which series the operator exposes before anything happens: at 0 for every label set it knows, because Prometheus'
increase() and rate() see a step only from a sample before it. A Failed-runs series born at 1 would never fire
KleinstyleRunsFailing for the first failure (tests/chart/promtool/runs_failing.yaml shows Prometheus' side)."""

from __future__ import annotations

from kleinstyle.operator import metrics
from kleinstyle.operator.api import BY_KIND
from kleinstyle.operator.usage import Change

from .test_usage import T0, job, status


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_every_kinds_reconcile_errors_are_exposed_at_zero_from_the_start():
    for kind in BY_KIND:
        assert sample("kleinstyle_reconciles_total", kind=kind, outcome="error") is not None, kind
        assert sample("kleinstyle_run_duration_seconds_count", kind=kind, outcome="Failed") is not None, kind
        assert sample("kleinstyle_children_created_total", kind=kind, child="Job") is not None, kind


def test_a_namespaces_counters_are_at_zero_from_its_first_reconcile():
    ns = "zero-series-first-seen"
    assert sample("kleinstyle_runs_total", namespace=ns, kind="StyleLoRA", outcome="Failed") is None
    lora = Change.of("StyleLoRA", ns, "l", {}, status("Pending"), {"j1": job(gpus=2, pool="h200")}, T0)
    metrics.record(lora)
    for outcome in ("Succeeded", "Failed"):
        assert sample("kleinstyle_runs_total", namespace=ns, kind="StyleLoRA", outcome=outcome) == 0
    assert sample("kleinstyle_queue_wait_seconds_count", namespace=ns, kind="StyleLoRA") == 0
    assert sample("kleinstyle_gpu_seconds_total", namespace=ns, kind="StyleLoRA", node_pool="h200") == 0
    assert sample("kleinstyle_checkpoints_scored_total", namespace=ns) == 0
    for cause in ("no_improvement", "guards", "stop_requested"):
        assert sample("kleinstyle_early_stops_total", namespace=ns, reason=cause) == 0
    metrics.record(Change.of("GenerationJob", ns, "g", {}, status("Pending"), {}, T0))
    metrics.record(Change.of("LoRAFusion", ns, "f", {}, status("Pending"), {}, T0))
    assert sample("kleinstyle_images_rendered_total", namespace=ns) == 0
    assert sample("kleinstyle_fusion_seconds_count", namespace=ns) == 0
    metrics.forget(ns, "StyleLoRA", "l")  # only the per-resource series go with a resource
    assert sample("kleinstyle_runs_total", namespace=ns, kind="StyleLoRA", outcome="Failed") == 0
