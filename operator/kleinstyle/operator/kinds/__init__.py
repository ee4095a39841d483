"""What each kind runs, one module per kind behind one small interface (`base.KindRuns`)."""

from __future__ import annotations

from typing import Any

from .base import Dependency, KindRuns, NotReady, changed_inputs, check_dependencies, find_cycle, inputs
from .generationjob import GenerationJobRuns
from .lorafusion import LoRAFusionRuns
from .styleboard import StyleBoardRuns
from .stylelora import StyleLoRARuns

# By kind name: what reconcile reads of an object of any kind (its report checked to be of the kind's step).
KIND_RUNS: dict[str, KindRuns[Any, Any, Any, Any, Any]] = {
    runs.kind.kind: runs for runs in (StyleBoardRuns(), StyleLoRARuns(), GenerationJobRuns(), LoRAFusionRuns())
}

__all__ = [
    "KIND_RUNS",
    "Dependency",
    "KindRuns",
    "NotReady",
    "changed_inputs",
    "check_dependencies",
    "find_cycle",
    "inputs",
]
