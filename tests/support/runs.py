"""Training RunSpecs and Runs as the operator makes them, for tests of what a Job and a pod do with one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kleinstyle.contract.layout import run_folder
from kleinstyle.contract.plan import plan_training
from kleinstyle.contract.runspec import Owner, RunSpec, TrainSpec

if TYPE_CHECKING:
    from kleinstyle.operator.children import Run

OWNER = Owner(kind="StyleLoRA", plural="styleloras", namespace="team-a", name="l", uid="uid-1")


def train_work(dataset: str, steps: int = 500) -> TrainSpec:
    """Builtin training of `steps` on the 5-image dataset at `dataset`."""
    return TrainSpec(
        dataset_uri=dataset,
        trigger_word="tok",
        image_count=5,
        backend="builtin",
        model_path="/models/FLUX.2-klein-base-9B",
        plan=plan_training(5, {"training": {"steps": steps}}),
    )


def train_spec(steps: int = 500, owner: Owner = OWNER, root: str = "/artifacts") -> RunSpec:
    """A builtin training run of `steps` on a board of the owner's namespace, its output where the operator puts it
    (`root`/run folder)."""
    work = train_work(f"{root}/{owner.namespace}/styleboard/b/uid-2/0123456789/dataset", steps)
    provisional = RunSpec(owner=owner, output_uri="", output_display_uri="", work=work)
    output = f"{root}/{run_folder(owner, provisional.content_hash())}"
    return provisional.model_copy(update={"output_uri": output, "output_display_uri": output})


def train_run(steps: int = 500) -> Run:
    from kleinstyle.operator.children import Run  # the operator's side only where a test asks for it

    spec = train_spec(steps)
    return Run(runspec=spec, step="train", run_hash=spec.content_hash(), owner_api_version="kleinstyle.dev/v1alpha1")
