"""The four custom resources: their spec and status models and what the CRDs say about them."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.config import JsonDict

from .common import API_VERSION, GROUP, VERSION, CommonStatus, cel
from .generationjob import GenerationJobSpec, GenerationJobStatus
from .lorafusion import LoRAFusionSpec, LoRAFusionStatus
from .styleboard import StyleBoardSpec, StyleBoardStatus
from .stylelora import StyleLoRASpec, StyleLoRAStatus


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Kind:
    """One custom resource kind: names, models, and the columns `kubectl get` shows."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[CommonStatus]
    description: str
    columns: tuple[PrinterColumn, ...]
    # CEL rules on the whole object (the only place a rule may read metadata.name).
    root_rules: tuple[JsonDict, ...] = ()

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


PHASE = PrinterColumn("Phase", ".status.phase", description="Pending, Waiting, Running, Succeeded or Failed")
MESSAGE = PrinterColumn("Message", ".status.message", description="The current phase in one line", priority=1)
AGE = PrinterColumn("Age", ".metadata.creationTimestamp", type="date")

STYLEBOARD = Kind(
    kind="StyleBoard",
    plural="styleboards",
    short_names=("sb",),
    spec=StyleBoardSpec,
    status=StyleBoardStatus,
    description="Reference images of one visual style, captioned and prepared as a training dataset.",
    columns=(
        PHASE,
        PrinterColumn("Accepted", ".status.imagesAccepted", "integer", "Images in the dataset"),
        PrinterColumn("Rejected", ".status.imagesRejected", "integer", "Images left out"),
        PrinterColumn("Dataset", ".status.datasetURI", description="The prepared dataset", priority=1),
        MESSAGE,
        AGE,
    ),
)
STYLELORA = Kind(
    kind="StyleLoRA",
    plural="styleloras",
    short_names=("sl",),
    spec=StyleLoRASpec,
    status=StyleLoRAStatus,
    description="A style LoRA for FLUX.2 [klein] trained on a StyleBoard, stopped early at its best checkpoint.",
    columns=(
        PHASE,
        PrinterColumn("Progress", ".status.progressText", description="step/total"),
        PrinterColumn("Loss", ".status.loss", "number", "Latest training loss"),
        PrinterColumn("LoRA", ".status.loraURI", description="The trained LoRA", priority=1),
        MESSAGE,
        AGE,
    ),
)
GENERATIONJOB = Kind(
    kind="GenerationJob",
    plural="generationjobs",
    short_names=("gj",),
    spec=GenerationJobSpec,
    status=GenerationJobStatus,
    description="Images rendered with FLUX.2 [klein] and one or more style LoRAs.",
    columns=(
        PHASE,
        PrinterColumn("Done", ".status.imagesDone", "integer", "Images rendered"),
        PrinterColumn("Total", ".status.imagesTotal", "integer", "Images to render"),
        PrinterColumn("Sheet", ".status.contactSheetURI", description="Contact sheet", priority=1),
        MESSAGE,
        AGE,
    ),
)
LORAFUSION = Kind(
    kind="LoRAFusion",
    plural="lorafusions",
    short_names=("lf",),
    spec=LoRAFusionSpec,
    status=LoRAFusionStatus,
    description="Several LoRAs fused into one (concat, svd or K-LoRA).",
    root_rules=(
        cel(
            "self.spec.sources.all(s, s.kind != 'LoRAFusion' || s.name != self.metadata.name)",
            "a LoRAFusion cannot fuse itself",
            ".spec.sources",
        ),
    ),
    columns=(
        PHASE,
        PrinterColumn("Method", ".spec.method", description="Fusion method"),
        PrinterColumn("Rank", ".status.rank", "integer", "Rank of the fused LoRA"),
        PrinterColumn("Energy", ".status.energyKept", "number", "Energy kept", priority=1),
        PrinterColumn("LoRA", ".status.loraURI", description="The fused LoRA", priority=1),
        MESSAGE,
        AGE,
    ),
)

KINDS: tuple[Kind, ...] = (STYLEBOARD, STYLELORA, GENERATIONJOB, LORAFUSION)
BY_KIND = {k.kind: k for k in KINDS}
BY_PLURAL = {k.plural: k for k in KINDS}

__all__ = ["API_VERSION", "BY_KIND", "BY_PLURAL", "GROUP", "KINDS", "VERSION", "Kind", "PrinterColumn"]
