"""Deterministic names and labels for the children of a resource.

A child's name is the owner's name, the step and a prefix of the RunSpec hash, so a restarted operator computes the
same name and adopts the child instead of creating a second one, and a changed spec yields a new run.
"""

from __future__ import annotations

import hashlib

from kleinstyle.contract.layout import RUN_ID_LENGTH

MANAGED_BY = "app.kubernetes.io/managed-by"
OWNER_KIND = "kleinstyle.dev/owner-kind"
OWNER_UID = "kleinstyle.dev/owner-uid"
RUN_HASH = "kleinstyle.dev/run-hash"
STEP = "kleinstyle.dev/step"
GENERATION = "kleinstyle.dev/generation"  # on Jobs: the owner's generation the run was started for
NODE_POOL = "kleinstyle.dev/node-pool"  # on GPU Jobs: the pool their GPU-seconds are counted against
HASH_LEN = RUN_ID_LENGTH
MAX_NAME = 63  # Job names end up in the job-name label of their pods: a label value is at most 63 characters.


def fit_name(*parts: str, limit: int = MAX_NAME) -> str:
    """Join parts with '-', shortening the first part (and hashing the full name in) when over `limit`."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    tail = "-".join(parts[1:])
    head = parts[0][: max(1, limit - len(tail) - len(digest) - 2)].rstrip("-.")
    return f"{head}-{digest}-{tail}"[:limit].rstrip("-.")


def run_name(owner: str, step: str, run_hash: str) -> str:
    return fit_name(owner, step, run_hash[:HASH_LEN])


def runner_name(owner: str, step: str) -> str:
    """ServiceAccount, Role and RoleBinding of an owner's runs (one set per owner, shared by its runs)."""
    return fit_name(owner, step, "runner")


def owner_labels(kind: str, uid: str) -> dict[str, str]:
    return {MANAGED_BY: "kleinstyle", OWNER_KIND: kind, OWNER_UID: uid}


def run_labels(kind: str, uid: str, step: str, run_hash: str) -> dict[str, str]:
    return {**owner_labels(kind, uid), STEP: step, RUN_HASH: run_hash[:HASH_LEN]}


def selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
