"""A run's pod as both sides see it: the command it runs, where its files are mounted, the environment variables
that carry keys and endpoints into it, and the exit codes it leaves.

The operator builds the Job from these names and the runtime reads them; one spelling, so neither side can drift.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from .layout import RUN_ID_LENGTH

Step = Literal["prepare", "train", "generate", "fuse"]

# The run's ConfigMap is mounted here: the RunSpec, and beside it any file a backend launches with.
RUNSPEC_DIR = "/etc/kleinstyle"
RUNSPEC_FILE = "runspec.json"
AITOOLKIT_CONFIG_FILE = "aitoolkit.yaml"  # the ai-toolkit job config of a train run on that backend
RUNSPEC_PATH = f"{RUNSPEC_DIR}/{RUNSPEC_FILE}"
AITOOLKIT_CONFIG_PATH = f"{RUNSPEC_DIR}/{AITOOLKIT_CONFIG_FILE}"
# Kubernetes reads a container's last words from here (terminationMessagePath's default).
TERMINATION_LOG = "/dev/termination-log"

# Exit codes of every step. 2: input the run can never succeed on; 3: the artifacts volume (or the user's quota on
# it) is full, which the next pod would only hit again after redoing the same work. The Job's podFailurePolicy fails
# both at once instead of retrying; 1: a failure a retry may fix (the next pod resumes where this one stopped).
EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_VOLUME_FULL = 0, 1, 2, 3
NEVER_RETRIED = (EXIT_BAD_SPEC, EXIT_VOLUME_FULL)
# The status reason of a run whose pod ended with one of these codes.
FAILURE_REASONS = {EXIT_BAD_SPEC: "BadInput", EXIT_VOLUME_FULL: "VolumeFull"}


def failure_reason(exit_code: int | None) -> str | None:
    """The status reason a failed pod's exit code stands for (BadInput, VolumeFull); None for any other code."""
    return FAILURE_REASONS.get(exit_code) if exit_code is not None else None


def command(step: Step) -> list[str]:
    """The container's command for `step`."""
    return ["kleinstyle", step, "--spec", RUNSPEC_PATH]


# Where a pod finds a text provider's API key: an env var filled from a Secret, never a file or a flag.
PROVIDER_KEY_ENV = {"gemini": "GEMINI_API_KEY", "openrouter": "OPENROUTER_API_KEY"}
# The admin's endpoint override per text provider (an egress proxy, a test server).
PROVIDER_URL_ENV = {"gemini": "KLEINSTYLE_GEMINI_BASE_URL", "openrouter": "KLEINSTYLE_OPENROUTER_BASE_URL"}
# A StyleBoard's storageSecret keys and the env vars the prepare step reads them from: under names of their own, so
# the artifact store's credentials (the standard names below) can never be used to read a tenant's sources.
SOURCE_CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID": "KLEINSTYLE_SOURCE_AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "KLEINSTYLE_SOURCE_AWS_SECRET_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": "KLEINSTYLE_SOURCE_GOOGLE_CREDENTIALS_JSON",
}
# The artifact store's credentials: the Secret's keys arrive under these same standard names (s3fs reads the AWS
# ones; the runtime turns the Google JSON into a private credentials file for gcsfs).
ARTIFACT_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON")
GCS_CREDENTIALS_JSON_ENV = "GOOGLE_APPLICATION_CREDENTIALS_JSON"
# The artifact store's Secret (operator config artifacts.credentialsSecret, looked up in the run's own namespace) names,
# under the key ARTIFACT_PREFIX_KEY, the prefix its credentials are limited to (s3://bucket/kleinstyle/team-a/): the
# runtime reads and writes artifact URIs only under it. The Secret's name comes along so that a refusal can name it.
ARTIFACT_PREFIX_KEY = "prefix"
ARTIFACT_PREFIX_ENV = "KLEINSTYLE_ARTIFACT_PREFIX"
ARTIFACT_SECRET_ENV = "KLEINSTYLE_ARTIFACT_SECRET"
# pvc:// image sources: each claim is mounted read-only at REFERENCES_MOUNT/CLAIM of the prepare pod, which reads a
# source only inside the mount of its own claim.
REFERENCES_MOUNT = "/references"
# The dev cluster's local executor only: a plain http API base URL (no auth) to report to.
KUBE_API_ENV = "KLEINSTYLE_KUBE_API"
# The dev cluster's kubelets only (the emulator's executor, the real control plane's node agent): the folder under
# which a pod's process finds its pod paths (pods there are processes, their mounts symlinks in that folder).
ROOTFS_ENV = "KLEINSTYLE_ROOTFS"
# Where every pod finds its ServiceAccount's projected token and the cluster's CA (in-cluster credentials).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_TOKEN = f"{SERVICE_ACCOUNT_DIR}/token"
SERVICE_ACCOUNT_CA = f"{SERVICE_ACCOUNT_DIR}/ca.crt"


def local_path(pod_path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Path:
    """Where the pod path `pod_path` is on this machine: itself in a real container, under $KLEINSTYLE_ROOTFS in a
    pod the dev cluster runs as a process. Both sides open every absolute pod path through it (the runtime its
    RunSpec and volumes, the operator its config file and in-cluster credentials), so one code path serves both."""
    path = Path(pod_path)
    rootfs = (os.environ if env is None else env).get(ROOTFS_ENV)
    if rootfs and path.is_absolute():
        return Path(rootfs) / path.relative_to("/")
    return path


# A user stops a run by annotating its owner: `kleinstyle.dev/stop: "RUN_ID: reason"` (the reason may be left out).
# An annotation, not a status field: a tenant sets it with ordinary edit rights, and nothing the pod acts on comes
# from status, which the run's own ServiceAccount (and, in many clusters, the tenant) may write.
# The value names the run it stops (`status.runHash`) so that a request made of one run never stops a later one: the
# check needs no write by the operator when a new run starts, so no operator restart or race between "clear the
# annotation" and "start the run" can leave a stale request standing, and a GitOps tool that re-applies it is
# harmless.
STOP_ANNOTATION = "kleinstyle.dev/stop"
STOP_REQUESTED = "stop requested"  # a stopped run's stop reason (": " and the user's reason, when one was given)
STOP_REASON_LIMIT = 200  # characters of the reason kept (it travels into status and the termination message)
_STOP_VALUE = re.compile(rf"([0-9a-f]{{{RUN_ID_LENGTH}}})(?:\s*:\s*|\s+|$)(.*)", re.DOTALL)


def parse_stop(value: str) -> tuple[str, str] | None:
    """(run id, reason) of a stop annotation's value `RUN_ID[: reason]`; None when it does not begin with a run id."""
    found = _STOP_VALUE.fullmatch(value.strip())
    if found is None:
        return None
    return found.group(1), " ".join(found.group(2).split())[:STOP_REASON_LIMIT]


def stop_request(annotations: Mapping[str, str] | None, run_id: str) -> str | None:
    """The reason (possibly empty) of the stop `annotations` ask of run `run_id`; None when they ask none of it."""
    value = (annotations or {}).get(STOP_ANNOTATION)
    parsed = parse_stop(value) if isinstance(value, str) else None
    return parsed[1] if parsed is not None and parsed[0] == run_id[:RUN_ID_LENGTH] else None
