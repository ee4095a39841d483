"""LoRAFusion: 2-8 LoRAs -> a `fuse` run (CPU) -> one fused LoRA.

YAML -> `build`: the sources' files and weights, the method and target, and what generation will need of the result
(the sources' trigger words, whether their plans keep the text pipeline, the first source's STYLE_PROFILE) -> Job
`kleinstyle fuse` (runtime.fuse) -> `FuseResult` (`result`: rank, energy kept, duration; the LoRA's URI from the
RunSpec). What generation reads is in status as soon as the run is planned (`planned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kleinstyle.contract.layout import LORA_FILE
from kleinstyle.contract.reports import FuseResult
from kleinstyle.contract.runspec import FuseSpec

from ..api import BY_KIND
from ..api.lorafusion import LoRAFusionOutcome, LoRAFusionSpec, LoRAFusionStatus
from ..children import Run
from ..config import OperatorConfig
from .base import Dependencies, Dependency, KindRuns, build_run
from .loras import lora_dependencies, lora_inputs, lora_style, style_profile, trigger_words


class LoRAFusionRuns(KindRuns[LoRAFusionSpec, FuseSpec, None, FuseResult, LoRAFusionStatus]):
    kind = BY_KIND["LoRAFusion"]
    step = "fuse"
    outcome = LoRAFusionOutcome
    status_type = LoRAFusionStatus
    work_type = FuseSpec

    def dependencies(self, spec: LoRAFusionSpec) -> list[Dependency]:
        return lora_dependencies(spec.sources)

    def build(self, body: Mapping[str, Any], spec: LoRAFusionSpec, deps: Dependencies, cfg: OperatorConfig) -> Run:
        used = [ref for ref in spec.sources if ref.weight != 0]
        styles = [lora_style(ref, deps) for ref in used]
        keeps = [style.text_pipeline for style in styles]
        work = FuseSpec(
            sources=lora_inputs(spec.sources, deps, cfg),
            method=spec.method,
            rank=spec.rank,
            energy=spec.energy,
            selection=spec.selection or "hard",
            trigger_words=trigger_words(styles),
            text_pipeline=None if None in keeps else all(keeps),
            style_profile=style_profile(used, deps),
        )
        return build_run(self.kind, body, work, cfg, spec.scheduling)

    def planned(self, run: Run) -> tuple[LoRAFusionStatus, list[str]]:
        work = self.work(run)
        status = LoRAFusionStatus(
            trigger_words=list(work.trigger_words), text_pipeline=work.text_pipeline, style_profile=work.style_profile
        )
        return status, []

    def result(self, result: FuseResult, run: Run) -> LoRAFusionStatus:
        return LoRAFusionStatus(
            lora_uri=f"{run.runspec.output_display_uri}/{LORA_FILE}",
            rank=result.rank,
            energy_kept=result.energy_kept,
            duration_seconds=result.duration_seconds,
        )
