"""The ai-toolkit backend: ostris' trainer as a subprocess, driven by the job config the operator wrote beside the
RunSpec (kleinstyle.runtime.aitoolkit_run launches it and reads its progress and checkpoints).

It trains into `aitoolkit/NAME/` on the artifact volume (an object store cannot hold its folder) and resumes by
itself from the newest checkpoint there; a save cut off by a killed pod is deleted first. ai-toolkit has no
SIGTERM handler and saves nothing on a stop, so a stopped run promotes a checkpoint ai-toolkit already saved.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kleinstyle.contract.layout import WORK_DIR
from kleinstyle.contract.pod import AITOOLKIT_CONFIG_PATH, EXIT_BAD_SPEC, EXIT_FAILED
from kleinstyle.contract.runspec import RunSpec

from .. import aitoolkit_run
from ..artifacts import join_uri
from ..errors import BadInput
from ..paths import is_object_store, local_path
from ..step import Outcome
from .backend import Trained
from .judge import Judge
from .reporter import TrainReporter
from .settings import held_out_count, train_spec

log = logging.getLogger(__name__)

# aitoolkit_run's failures a retry cannot fix: exit 2.
FAILURES_NEVER_RETRIED = ("ModelMissing", "BadDataset", aitoolkit_run.TOOLKIT_MISSING)


class AIToolkitBackend:
    """A training run on ai-toolkit."""

    def __init__(self, spec: RunSpec, reporter: TrainReporter) -> None:
        self.spec = spec
        self.reporter = reporter
        self.work_dir = local_path(join_uri(spec.output_uri, WORK_DIR))
        self.config_path = self.work_dir / "aitoolkit.yaml"  # the job config with this machine's paths
        self.training_folder = Path()
        self.name = ""
        self.total = 0

    def prepare(self) -> Outcome | None:
        """The operator's job config, its paths made this machine's, written to the work folder."""
        import yaml

        spec = self.spec
        if is_object_store(spec.output_uri):
            raise BadInput("ai-toolkit trains into a folder on the artifact volume (a PVC), not an object store")
        source = local_path(AITOOLKIT_CONFIG_PATH)
        if not source.is_file():
            raise BadInput(f"the ai-toolkit config {AITOOLKIT_CONFIG_PATH} is missing from the run's ConfigMap")
        config: dict[str, Any] = yaml.safe_load(source.read_text())
        process = config["config"]["process"][0]
        self.name = str(config["config"]["name"])
        self.total = int(process["train"]["steps"])
        self.training_folder = local_path(process["training_folder"])
        # ai-toolkit reads pod paths; under a local rootfs they must point where this machine keeps them.
        process["training_folder"] = str(self.training_folder)
        if str(process["model"].get("name_or_path", "")).startswith("/"):
            process["model"]["name_or_path"] = str(local_path(process["model"]["name_or_path"]))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for dataset in process.get("datasets") or []:
            dataset["folder_path"] = str(self._without_held_out(local_path(dataset["folder_path"])))
        self.training_folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")  # by every pod
        return None

    def train(self, judge: Judge | None) -> Trained | Outcome:
        # With a judge, scoring shares the GPU with ai-toolkit (one more bf16 transformer: ~18 GB on klein 9B).
        spec, reporter, folder, name, total = self.spec, self.reporter, self.training_folder, self.name, self.total
        seen: set[int] = set()
        paths: dict[int, Path] = {}

        def on_progress(progress: aitoolkit_run.Progress) -> None:
            for step, path in aitoolkit_run.checkpoints(folder, name):
                if step not in seen and aitoolkit_run.is_complete(path):
                    seen.add(step)
                    paths[step] = path
                    uri = join_uri(spec.output_display_uri, str(path.relative_to(local_path(spec.output_uri))))
                    if judge is not None:
                        judge.judge(step, path)
                    reporter.add_checkpoint(step, uri, reporter.loss)
            reporter.on_step(progress.step, progress.total, progress.loss, progress.lr, None)

        final = folder / name / f"{name}.safetensors"
        for path in aitoolkit_run.discard_incomplete(folder, name):
            log.warning("deleted %s: cut off by a killed save; ai-toolkit resumes from the one before", path.name)
        if aitoolkit_run.is_complete(final):  # an earlier pod of this run finished training but not its report
            log.info("ai-toolkit already finished this run; publishing from %s", final.parent)
            on_progress(aitoolkit_run.Progress(total, total))
            outcome = aitoolkit_run.RunOutcome(exit_code=0, stopped=False, last=None, failure=None)
        else:
            outcome = aitoolkit_run.launch(self.config_path, on_progress=on_progress, should_stop=reporter.should_stop)
            on_progress(outcome.last or aitoolkit_run.Progress(reporter.step, total))  # the last checkpoints
        if judge is not None and total not in paths and aitoolkit_run.is_complete(final):
            paths[total] = final  # ai-toolkit saves no step checkpoint at the end: its final file is that step's
            judge.judge(total, final)
        last_loss = outcome.last.loss if outcome.last else None
        if outcome.stopped:
            return self._trained(reporter.step, paths, None, last_loss, reporter.loss_at)
        if outcome.failure is not None:
            reason, message = outcome.failure
            code = EXIT_BAD_SPEC if reason in FAILURES_NEVER_RETRIED else EXIT_FAILED
            return Outcome(code, f"{reason}: {message} (ai-toolkit exit code {outcome.exit_code})")
        if not aitoolkit_run.is_complete(final):
            return Outcome(EXIT_FAILED, f"ai-toolkit finished without a complete {final.name}")

        def loss_at(step: int) -> float | None:
            return last_loss if step == total else reporter.loss_at(step)

        # The last step's LoRA is the final file, whichever file ai-toolkit saved for that step besides.
        return self._trained(total, {**paths, total: final}, final, last_loss, loss_at)

    def _trained(
        self,
        steps: int,
        checkpoints: dict[int, Path],
        final: Path | None,
        final_loss: float | None,
        loss_at: Callable[[int], float | None],
    ) -> Trained:
        return Trained(
            total=self.total,
            steps=steps,
            checkpoints=checkpoints,
            final=final,
            final_loss=final_loss,
            stopped=final is None,
            loss_at=loss_at,
            nothing_saved="stop requested before ai-toolkit saved a checkpoint: nothing to promote",
        )

    def _without_held_out(self, folder: Path) -> Path:
        """The dataset ai-toolkit trains on: `folder` itself, or, when the plan holds references out for the
        validation loss, a folder of links to the others (ai-toolkit trains on whatever its folder holds)."""
        from ..klein.dataset import held_out, read_dataset

        count = held_out_count(train_spec(self.spec))
        if count == 0:
            return folder
        training, _ = held_out(read_dataset(folder), count)
        target = self.work_dir / "dataset-train"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for sample in training:
            for path in (sample.image, sample.image.with_suffix(".txt")):
                if path.is_file():
                    (target / path.name).symlink_to(path.resolve())
        return target
