"""What a resource says about its dependencies: a missing one is a Warning, a cycle stalls with the chain named, a
finished run stays as it ended when an input is retrained (SourcesCurrent says so), and the image cap."""

from __future__ import annotations

import copy

from kleinstyle.operator.config import GenerationLimits
from kleinstyle.operator.kinds import Dependency, find_cycle
from kleinstyle.operator.reconcile import reconcile

from tests.support.records import observed

from .test_reconcile import (
    CFG,
    NOW,
    _job,
    generate_work,
    generation,
    report,
    trained_lora,
    with_status,
)


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_missing_dependency_waits_with_a_warning_until_it_exists():
    decision = reconcile(observed(body=generation()), CFG, NOW)
    conds = conditions(decision.status)
    assert decision.status["phase"] == "Waiting" and conds["Ready"]["reason"] == "StyleLoRANotFound"
    assert conds["Warning"]["status"] == "True" and "does not exist in this namespace" in conds["Warning"]["message"]
    assert conds["Reconciling"]["status"] == "True"  # GitOps may be creating it: not stalled
    assert [e.type for e in decision.events] == ["Warning"]
    # Once it exists (still running), the warning goes.
    running = trained_lora()
    running["status"]["phase"] = "Running"
    body = with_status(generation(), decision)
    later = reconcile(observed(body=body, dependencies={("StyleLoRA", "bd9-lora"): running}), CFG, NOW)
    assert conditions(later.status)["Warning"]["status"] == "False"


def test_a_cycle_stalls_naming_the_chain():
    cycle = (("LoRAFusion", "a"), ("LoRAFusion", "b"), ("LoRAFusion", "a"))
    body = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "LoRAFusion",
        "metadata": {"name": "a", "namespace": "team-a", "uid": "uid-a", "generation": 1},
        "spec": {"sources": [{"kind": "LoRAFusion", "name": "b"}, {"name": "ink"}]},
    }
    decision = reconcile(observed(body=body, cycle=cycle), CFG, NOW)
    conds = conditions(decision.status)
    assert decision.status["phase"] == "Waiting" and decision.create == []
    assert "LoRAFusion a -> LoRAFusion b -> LoRAFusion a" in decision.status["message"]
    assert (conds["Stalled"]["status"], conds["Warning"]["status"]) == ("True", "True")


def test_find_cycle_follows_references_through_the_namespace():
    graph = {
        ("LoRAFusion", "a"): [
            Dependency("LoRAFusion", "b", "lora.safetensors"),
            Dependency("StyleLoRA", "ink", "lora.safetensors"),
        ],
        ("LoRAFusion", "b"): [Dependency("LoRAFusion", "c", "lora.safetensors")],
        ("LoRAFusion", "c"): [Dependency("LoRAFusion", "a", "lora.safetensors")],
        ("StyleLoRA", "ink"): [Dependency("StyleBoard", "bd9", "dataset")],
    }
    found = find_cycle(("LoRAFusion", "a"), lambda node: graph.get(node, []))
    assert found == [("LoRAFusion", "a"), ("LoRAFusion", "b"), ("LoRAFusion", "c"), ("LoRAFusion", "a")]
    assert find_cycle(("StyleLoRA", "ink"), lambda node: graph.get(node, [])) is None
    # A cycle the object is not on (it only leads into one) is that other object's to report.
    graph[("GenerationJob", "g")] = [Dependency("LoRAFusion", "a", "lora.safetensors")]
    assert find_cycle(("GenerationJob", "g"), lambda node: graph.get(node, [])) is None


def finished_generation():
    deps = {("StyleLoRA", "bd9-lora"): trained_lora(runHash="abc")}
    first = reconcile(observed(body=generation(), dependencies=deps), CFG, NOW)
    body = with_status(generation(), first)
    assert body["status"]["inputs"] == [{"kind": "StyleLoRA", "name": "bd9-lora", "runHash": "abc"}]
    result = {"images": [], "prompts": []}
    from kleinstyle.contract.reports import GenerateReport

    body["status"]["progress"] = report(first, GenerateReport, state="Succeeded", result=result)
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    done = reconcile(observed(body=body, dependencies=deps, children=[*first.create[:-1], job]), CFG, NOW)
    assert done.status["phase"] == "Succeeded"
    body["status"].update(done.status)
    return body, [*first.create[:-1], job]


def test_a_finished_run_is_kept_and_says_when_an_input_was_retrained():
    body, children = finished_generation()
    retrained = trained_lora(
        runHash="def", loraURI="pvc://artifacts/team-a/stylelora/bd9-lora/uid/def/lora.safetensors"
    )
    kept = reconcile(
        observed(body=body, dependencies={("StyleLoRA", "bd9-lora"): retrained}, children=children), CFG, NOW
    )
    assert kept.create == [] and not any(c["kind"] == "Job" for c in kept.delete)  # no new run: the images stay
    assert kept.status["phase"] == "Succeeded"
    source = conditions(kept.status)["SourcesCurrent"]
    assert (source["status"], source["reason"]) == ("False", "SourceChanged")
    assert "StyleLoRA bd9-lora has a new run (abc -> def)" in source["message"]
    assert [e.reason for e in kept.events] == ["SourceChanged"]
    # Reconciled again: said once.
    body["status"].update(kept.status)
    again = reconcile(
        observed(body=body, dependencies={("StyleLoRA", "bd9-lora"): retrained}, children=children), CFG, NOW
    )
    assert again.events == []
    # Editing the spec (a new generation) runs again, with the new LoRA.
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    rerun = reconcile(
        observed(body=edited, dependencies={("StyleLoRA", "bd9-lora"): retrained}, children=children), CFG, NOW
    )
    assert any(c["kind"] == "Job" for c in rerun.create)
    assert generate_work(rerun)["loras"][0]["uri"].endswith("/def/lora.safetensors")


def test_an_unchanged_input_keeps_sources_current():
    body, children = finished_generation()
    kept = reconcile(
        observed(body=body, dependencies={("StyleLoRA", "bd9-lora"): trained_lora(runHash="abc")}, children=children),
        CFG,
        NOW,
    )
    assert conditions(kept.status)["SourcesCurrent"]["status"] == "True" and kept.events == []


def test_generation_limits_cap_the_images_per_job_and_say_so():
    capped = CFG.model_copy(update={"generation_limits": GenerationLimits(maxImages=5)})
    deps = {("StyleLoRA", "bd9-lora"): trained_lora()}
    decision = reconcile(observed(body=generation(count=16), dependencies=deps), capped, NOW)
    work = generate_work(decision)
    assert (len(work["prompts"]), len(work["seeds"]), decision.status["imagesTotal"]) == (2, 2, 4)
    assert "images capped at 4 (2 prompts x 2; asked 2 x 16 = 32)" in conditions(decision.status)["Warning"]["message"]
    many = reconcile(observed(body=generation(prompts=[f"p{i}" for i in range(9)]), dependencies=deps), capped, NOW)
    assert (len(generate_work(many)["prompts"]), many.status["imagesTotal"]) == (5, 5)
    within = reconcile(observed(body=generation(count=2), dependencies=deps), capped, NOW)
    assert generate_work(within)["seeds"] == [0, 1] and "capped" not in conditions(within.status)["Warning"]["message"]
