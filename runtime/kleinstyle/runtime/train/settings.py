"""What a training run works from: the builtin trainer's settings for its plan, the references it holds out, and
its dataset as a local folder.

Shared by both backends, the judge and the one-machine CLI, so that they agree on which references are held out and
where the dataset lies; the plan's translation is pure, and torch is imported only where settings are built.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kleinstyle.contract.plan import TrainingPlan
from kleinstyle.contract.runspec import RunSpec, TrainSpec

from ..errors import BadInput
from ..paths import is_remote, local_path

if TYPE_CHECKING:
    from ..klein.lora_train import TrainSettings

BFL_TO_DIFFUSERS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def diffusers_prefix(block: str) -> str:
    """A BFL/ai-toolkit block name (`single_blocks.3`) as the diffusers module prefix (`single_transformer_blocks.3.`);
    the trailing dot keeps block 1 from also matching 10-19."""
    kind, _, index = block.partition(".")
    if kind not in BFL_TO_DIFFUSERS or not index.isdigit():
        raise BadInput(f"block {block!r} is not a klein block name (double_blocks.N or single_blocks.N)")
    return f"{BFL_TO_DIFFUSERS[kind]}.{int(index)}."


def builtin_target(plan: TrainingPlan) -> str | tuple[str, ...]:
    """ "all", "single" and "double" stay names (they fit any klein size); custom blocks become diffusers prefixes."""
    target = plan.target_blocks.value
    if target in ("all", "single", "double"):
        return str(target)
    if not plan.blocks:
        raise BadInput("targetBlocks is custom but no blocks are listed")
    return tuple(diffusers_prefix(block) for block in plan.blocks)


def held_out_count(work: TrainSpec) -> int:
    """References the run leaves out of training: the plan's, when checkpoints are evaluated (the held-out loss
    is part of the evaluation), else none."""
    return int(work.plan.validation_images.value) if work.evaluation is not None and work.plan.early_stopping else 0


def train_settings(plan: TrainingPlan, validation_images: int = 0) -> TrainSettings:
    """The builtin trainer's TrainSettings for `plan` (imports torch), leaving `validation_images` out."""
    from ..klein.lora_train import TrainSettings

    v = plan.values()
    return TrainSettings(
        rank=int(v["rank"]),
        alpha=float(v["alpha"]),
        learning_rate=float(v["learning_rate"]),
        weight_decay=float(v["weight_decay"]),
        optimizer=v["optimizer"],
        steps=int(v["steps"]),
        scheduler=v["scheduler"],
        caption_dropout=float(v["caption_dropout"]),
        resolution=int(v["resolution"]),
        target=builtin_target(plan),
        checkpoint_every=int(v["checkpoint_every"]),
        checkpoint_steps=tuple(plan.checkpoint_steps),
        seed=int(v["seed"]),
        compile_blocks=True,  # on CUDA only
        fp8_base=bool(v["fp8_base"]),
        validation_images=validation_images,
        timestep_bias=v["timestep_bias"],
        noise_offset=float(v["noise_offset"]),
        flip_horizontal=bool(v["flip_horizontal"]),
        ema_decay=None if v["ema_decay"] is None else float(v["ema_decay"]),
        # Unset: the builtin trainer's default, off: README's benchmark on an H200, 0.530 s/step and 44.4 GiB without,
        # 0.733 s/step and 20.0 GiB with; on for GPUs with less memory.
        gradient_checkpointing=bool(v["gradient_checkpointing"]),
    )


def train_spec(spec: RunSpec) -> TrainSpec:
    """`spec`'s work, which is a StyleLoRA's training (the harness ran this step for a train RunSpec only)."""
    work = spec.work
    assert isinstance(work, TrainSpec)
    return work


def scratch(spec: RunSpec) -> Path:
    """This run's folder in the pod's scratch (/tmp, an emptyDir): the owner's uid keeps two resources with the same
    RunSpec apart where pods share a /tmp (the embedded cluster)."""
    return Path(tempfile.gettempdir()) / "kleinstyle" / f"{spec.owner.uid}-{spec.run_id()}"


def dataset_folder(spec: RunSpec) -> Path:
    """The board's dataset as a folder: on the artifact volume, or downloaded once into scratch from an object
    store (the trainer lists and re-reads it, which object stores do slowly)."""
    work = train_spec(spec)
    if not is_remote(work.dataset_uri):
        return local_path(work.dataset_uri)
    target = scratch(spec) / "dataset"
    if not (target / ".complete").is_file():
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(work.dataset_uri)
        shutil.rmtree(target, ignore_errors=True)
        fs.get(root.rstrip("/") + "/", str(target) + "/", recursive=True)
        (target / ".complete").write_text(work.dataset_uri)
    return target
