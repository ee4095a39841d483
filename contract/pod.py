"""A run's pod as both sides see it: the command it runs, where its files are mounted, the environment variables
that carry keys and endpoints into it, and the exit codes it leaves.

The operator builds the Job from these names and the runtime reads them; one spelling, so neither side can drift.
"""

from __future__ import annotations

from typing import Literal

Step = Literal["prepare", "train", "generate", "fuse"]

# The run's ConfigMap is mounted here: the RunSpec, and beside it any file a backend launches with.
RUNSPEC_DIR = "/etc/kleinstyle"
RUNSPEC_FILE = "runspec.json"
AITOOLKIT_CONFIG_FILE = "aitoolkit.yaml"  # the ai-toolkit job config of a train run on that backend
RUNSPEC_PATH = f"{RUNSPEC_DIR}/{RUNSPEC_FILE}"
AITOOLKIT_CONFIG_PATH = f"{RUNSPEC_DIR}/{AITOOLKIT_CONFIG_FILE}"
# Kubernetes reads a container's last words from here (terminationMessagePath's default).
TERMINATION_LOG = "/dev/termination-log"

# Exit codes of every step. 2: input the run can never succeed on, so the Job's podFailurePolicy fails it at once
# instead of retrying; 1: a failure a retry may fix (the next pod resumes where this one stopped).
EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC = 0, 1, 2


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
# The dev cluster's local executor only: a plain http API base URL (no auth) to report to, and the folder under
# which the process finds its pod paths (pods there are processes, their mounts symlinks in that folder).
KUBE_API_ENV = "KLEINSTYLE_KUBE_API"
ROOTFS_ENV = "KLEINSTYLE_ROOTFS"
