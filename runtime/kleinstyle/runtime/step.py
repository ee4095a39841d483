"""The harness every step's pod runs in: read the RunSpec, check its inputs, report progress, poll stop requests,
and end with one last report, a termination message and an exit code. A step (prepare, train, generate, fuse)
implements only its work:

    def work(spec: RunSpec, reporter: Reporter) -> Outcome

raising `BadInput` (errors.py) for input it can never succeed on. Exit codes (`contract.pod`): 0 done; 2 bad input
and 3 a full artifacts volume, which the Job's podFailurePolicy fails at once; 1 anything else, which the Job
retries and the next pod resumes.

Inputs (a dataset, LoRAs) are checked before anything is opened (`RunSpec.check_inputs`): only paths in this run's
namespace folder of the artifact store, never another scheme, so a URI planted in a dependency's status cannot make
the pod send a request or read another tenant's files.

Reports are the contract's typed `Report` for the step (`contract.reports`), sent as a merge patch on the owner's
`status.progress` (report.py). A result the API never heard of exits 1, so the Job's retry finds the published
result and reports it again: the operator learns a result only through status. Nothing is read back from status:
a stop request is the owner's `kleinstyle.dev/stop` annotation (`contract.pod.STOP_ANNOTATION`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, EXIT_VOLUME_FULL, Step, stop_request
from kleinstyle.contract.reports import REPORTS, State, StepProgress, StepResult
from kleinstyle.contract.runspec import RunSpec

from .artifact_scope import check_runspec
from .errors import BadInput, volume_full
from .paths import local_path
from .report import api_target, read_owner, report_progress, write_termination_message

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 2.0  # at most one progress report per this many seconds, besides state changes
STOP_POLL_S = 5.0  # how often a run that can stop early reads its owner's stop annotation
STOP_READ_TIMEOUT_S = 2.0  # polled from inside a training loop: a slow API may cost a step a little, never a stall


@dataclass(frozen=True)
class Outcome:
    """How a step ended: its exit code, one line for status and the termination message, and its result.

    `resumes`: the pod was interrupted (SIGTERM) and the Job's next pod goes on from its checkpoint, so the run is
    reported as still running, not failed."""

    code: int
    message: str
    result: StepResult | None = None
    resumes: bool = False


class Reporter:
    """Reports one run to its owner: state changes at once, progress at most every REPORT_INTERVAL_S, and whether
    the user asked the run to stop (the owner's stop annotation, read at most every STOP_POLL_S)."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[..., bool] = report_progress,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self._send = send
        # The run's progress as of now: a model, or a function that builds it at each report (training's).
        self.progress: StepProgress | Callable[[], StepProgress] | None = None
        self.interval = REPORT_INTERVAL_S
        self.stop_poll = STOP_POLL_S
        self._last_report = float("-inf")
        self._last_poll = float("-inf")
        self._stop: str | None = None

    def send(self, state: State, message: str, result: StepResult | None = None) -> bool:
        """Report now; True when the API took it (False also without any API: a run on one machine)."""
        self._last_report = self.clock()
        progress = self.progress() if callable(self.progress) else self.progress
        report = REPORTS[self.spec.work.step](
            run_hash=self.spec.run_id(), state=state, message=message, progress=progress, result=result
        )
        return self._send(self.spec.owner, report.model_dump(mode="json"))

    def update(self, progress: StepProgress, message: str, *, now: bool = False) -> None:
        """New progress, reported when the last report is old enough (or `now`)."""
        self.progress = progress
        if now:
            self.send("Running", message)
        else:
            self.tick(message)

    def tick(self, message: str) -> None:
        """Report the progress as it is when the last report is old enough."""
        if self.clock() - self._last_report >= self.interval:
            self.send("Running", message)

    def stop_request(self) -> str | None:
        """The reason (possibly empty) the user gave for stopping this run, or None while none was asked of it.

        Read from the owner's `metadata.annotations` (`contract.pod.stop_request`), which the user sets with
        ordinary edit rights; a request stands only when it names this run's id, so one made of an earlier run
        never stops this one. Never from status: status is output, and others may write it."""
        if self._stop is not None:
            return self._stop
        now = self.clock()
        if now - self._last_poll < self.stop_poll:
            return None
        self._last_poll = now
        owner = read_owner(self.spec.owner, timeout_s=STOP_READ_TIMEOUT_S)
        annotations = ((owner or {}).get("metadata") or {}).get("annotations")
        self._stop = stop_request(annotations if isinstance(annotations, dict) else None, self.spec.run_id())
        if self._stop is not None:
            log.info("stop requested%s", f": {self._stop}" if self._stop else "")
        return self._stop


def read_runspec(spec_path: str, step: Step) -> RunSpec | int:
    """The pod's RunSpec for `step`; or, when it cannot be read or is another step's, the exit code (2) after
    logging why and leaving it as the termination message (the Job fails at once: a retry reads the same file)."""
    try:
        spec = RunSpec.from_json(local_path(spec_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        message = f"cannot read the RunSpec {spec_path}: {exc}"
    else:
        if spec.work.step == step:
            return spec
        message = f"this is a {spec.work.step} RunSpec; `kleinstyle {step}` runs only {step}"
    log.error("%s", message)
    write_termination_message(message)
    return EXIT_BAD_SPEC


def run_step(spec_path: str, step: Step, work: Callable[[RunSpec, Reporter], Outcome]) -> int:
    """Run `work` on the RunSpec at `spec_path` and return the pod's exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = read_runspec(spec_path, step)
    if isinstance(spec, int):
        return spec
    reporter = Reporter(spec)
    try:
        spec.check_inputs()  # before anything is opened: a pod reads only its namespace's artifacts
        check_runspec(spec)  # and, on an object store, only the prefix its namespace's Secret is limited to
    except ValueError as exc:
        return conclude(Outcome(EXIT_BAD_SPEC, f"bad input: {exc}"), reporter)
    return conclude(run_work(spec, work, reporter), reporter)


def run_work(spec: RunSpec, work: Callable[[RunSpec, Reporter], Outcome], reporter: Reporter) -> Outcome:
    """`work`'s outcome, with the exceptions it raised turned into one."""
    try:
        return work(spec, reporter)
    except BadInput as exc:
        return Outcome(EXIT_BAD_SPEC, f"bad input: {exc}")
    except Exception as exc:
        log.exception("%s failed", spec.work.step)
        if (full := volume_full(exc)) is not None:
            return Outcome(EXIT_VOLUME_FULL, full)
        return Outcome(EXIT_FAILED, f"{spec.work.step} failed: {type(exc).__name__}: {exc}")


def conclude(outcome: Outcome, reporter: Reporter) -> int:
    """The run's last report, its termination message and its exit code."""
    message = outcome.message
    (log.info if outcome.code == EXIT_OK else log.error)("%s", message)
    if outcome.code == EXIT_OK:
        if not reporter.send("Succeeded", message, outcome.result) and api_target() is not None:
            message = "the result could not be reported to the Kubernetes API"
            write_termination_message(message)
            return EXIT_FAILED
    else:
        reporter.send("Running" if outcome.resumes else "Failed", message, outcome.result)
    write_termination_message(message)
    return outcome.code
