"""Pure builders of the children of a resource, as plain manifests (dicts).

A run is a ConfigMap holding the RunSpec and a Job that reads it, plus a ServiceAccount, Role and RoleBinding that
let the Job patch its owner's status (and nothing else). Pods run non-root on a read-only root filesystem with all
capabilities dropped; API keys reach them only through secretKeyRef. A pod sees, of the artifact volume, only its own
run's folder (read-write) and its inputs' run folders (read-only), each a subPath mount at the path the RunSpec names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kleinstyle.contract.pod import (
    ARTIFACT_CREDENTIAL_ENV,
    ARTIFACT_PREFIX_ENV,
    ARTIFACT_PREFIX_KEY,
    ARTIFACT_SECRET_ENV,
    NEVER_RETRIED,
    REFERENCES_MOUNT,
    RUNSPEC_DIR,
    RUNSPEC_FILE,
    Step,
    command,
)
from kleinstyle.contract.runspec import Owner, RunSpec

from .config import OperatorConfig
from .kueue import PRIORITY_LABEL, QUEUE_LABEL
from .naming import GENERATION, NODE_POOL, owner_labels, run_labels, run_name, runner_name

GPU_STEPS = frozenset({"train", "generate"})
# Steps that publish their run folder whole (runtime.artifacts stages `.RUN.tmp-*` beside it, then renames it into
# place): the run folder cannot be their mount point, so they get their owner's folder, which holds nothing but that
# owner's runs and its text cache (prepare's).
PUBLISHES_RUN_FOLDER = frozenset({"prepare", "fuse"})
# {namespace}/{kind}/{name}/{uid}/{run_id}: the segments of a run folder (contract.layout.run_folder).
RUN_FOLDER_DEPTH = 5


class InvalidSpec(Exception):
    """A spec the schema let through that this operator cannot run (a source that names one of its own volumes, an
    input outside the namespace's folder): the resource fails with reason InvalidSpec and this message, which names
    the field and the rule."""


@dataclass(frozen=True)
class SecretEnv:
    """An env var filled from a Secret key (the only way API keys reach a pod)."""

    env: str
    secret: str
    key: str
    optional: bool = False


@dataclass(frozen=True)
class Run:
    """What the builders need to know about one run of one owner."""

    runspec: RunSpec
    step: Step
    run_hash: str
    owner_api_version: str
    gpus: int = 0
    node_pool: str | None = None
    queue_name: str | None = None
    priority_class: str | None = None
    secret_env: tuple[SecretEnv, ...] = ()
    # PVCs mounted read-only at REFERENCES_MOUNT/CLAIM (pvc:// image sources).
    reference_claims: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    # More files beside the RunSpec in the ConfigMap (e.g. the ai-toolkit config the trainer launches with).
    files: dict[str, str] = field(default_factory=dict)
    # The owner's metadata.generation the run was started for, recorded on its Job: the run goes on, whatever its
    # dependencies or the operator's configuration do since, until the owner's spec changes (reconcile).
    generation: int | None = None

    @property
    def owner(self) -> Owner:
        return self.runspec.owner

    @property
    def name(self) -> str:
        return run_name(self.owner.name, self.step, self.run_hash)

    @property
    def runner(self) -> str:
        return runner_name(self.owner.name, self.step)

    @property
    def labels(self) -> dict[str, str]:
        return run_labels(self.owner.kind, self.owner.uid, self.step, self.run_hash)


def owner_reference(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": run.owner_api_version,
        "kind": run.owner.kind,
        "name": run.owner.name,
        "uid": run.owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(run: Run, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.owner.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(run)],
    }


def build_configmap(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, run.name, run.labels),
        "data": {RUNSPEC_FILE: run.runspec.to_json(), **run.files},
    }


def build_rbac(run: Run) -> list[dict[str, Any]]:
    """A ServiceAccount allowed to read its owner and patch the owner's status, by name, and nothing else."""
    labels = owner_labels(run.owner.kind, run.owner.uid)
    group = run.owner_api_version.split("/")[0]
    plural = run.owner.plural
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(run, run.runner, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(run, run.runner, labels),
            "rules": [
                {"apiGroups": [group], "resources": [plural], "resourceNames": [run.owner.name], "verbs": ["get"]},
                {
                    "apiGroups": [group],
                    "resources": [f"{plural}/status"],
                    "resourceNames": [run.owner.name],
                    "verbs": ["get", "patch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(run, run.runner, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": run.runner},
            "subjects": [{"kind": "ServiceAccount", "name": run.runner, "namespace": run.owner.namespace}],
        },
    ]


def _env(run: Run, cfg: OperatorConfig) -> list[dict[str, Any]]:
    plain = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache", "HF_HUB_OFFLINE": "1", **run.extra_env}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    # torch and BLAS start a thread per core of the node, not of the pod: hold them to the pod's CPU request
    # (rounded up), or a 16-core request on a 128-core node runs 128 threads that wait on each other.
    cpus = {"resource": "requests.cpu", "divisor": "1", "containerName": run.step}
    env.append({"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": cpus}})
    secrets = run.secret_env
    if cfg.artifacts.uri and cfg.artifacts.credentials_secret:
        env.append({"name": ARTIFACT_SECRET_ENV, "value": cfg.artifacts.credentials_secret})
        secrets = (*secrets, *artifact_store_env(cfg.artifacts.credentials_secret))
    for item in secrets:
        ref: dict[str, str | bool] = {"name": item.secret, "key": item.key}
        if item.optional:
            ref["optional"] = True
        env.append({"name": item.env, "valueFrom": {"secretKeyRef": ref}})
    return env


def artifact_store_env(secret: str) -> tuple[SecretEnv, ...]:
    """The object store's credentials and the prefix they are limited to, from `secret` in the run's own namespace:
    each tenant holds a key for its own prefix only, and the runtime refuses any artifact URI outside that prefix."""
    return (
        *(SecretEnv(env, secret, env, optional=True) for env in ARTIFACT_CREDENTIAL_ENV),
        # Optional so that a Secret without it fails the run naming what is missing (runtime.artifact_scope)
        # instead of holding the pod in CreateContainerConfigError.
        SecretEnv(ARTIFACT_PREFIX_ENV, secret, ARTIFACT_PREFIX_KEY, optional=True),
    )


def run_folder_of(field: str, uri: str, root: str, namespace: str, *, inside: bool = True) -> str:
    """The run folder (relative to the artifact store's `root`) that `uri` lies in (`inside`) or is; InvalidSpec,
    naming `field`, unless that is a run folder of `namespace`: a run never reaches another namespace's artifacts."""
    prefix = f"{root.rstrip('/')}/"
    parts = uri[len(prefix) :].rstrip("/").split("/") if uri.startswith(prefix) else []
    if len(parts) < RUN_FOLDER_DEPTH + inside or parts[0] != namespace or {"", ".", ".."} & set(parts):
        raise InvalidSpec(
            f"{field}: {uri} is not inside a run folder under {prefix}{namespace}/ (this namespace's artifacts, "
            "without '.', '..' or empty segments); a run reads only its own namespace's runs"
        )
    return "/".join(parts[:RUN_FOLDER_DEPTH])


def artifact_folders(run: Run, cfg: OperatorConfig) -> dict[str, bool]:
    """The folders of the artifact store a run uses, relative to its root, each with whether it is read-only: the
    run's own folder (its owner's, for a step that publishes it whole) and each input's run folder; InvalidSpec when
    one is not in the run's namespace."""
    root, namespace = cfg.artifacts.uri or cfg.artifacts.mount_path, run.owner.namespace
    output = run_folder_of("output_uri", run.runspec.output_uri, root, namespace, inside=False)
    if run.step in PUBLISHES_RUN_FOLDER:
        output = output.rsplit("/", 1)[0]
    folders = {output: False}
    for name, uri in run.runspec.input_uris():
        folder = run_folder_of(name, uri, root, namespace)
        if not any(folder == seen or folder.startswith(f"{seen}/") for seen in folders):
            folders[folder] = True
    return folders


def _volumes(run: Run, cfg: OperatorConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "runspec", "configMap": {"name": run.name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "runspec", "mountPath": RUNSPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    folders = artifact_folders(run, cfg)
    if not cfg.artifacts.uri:
        # Only these folders of the claim, at the paths the RunSpec names: one RWX filesystem may hold every namespace.
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": cfg.artifacts.claim_name}})
        root = cfg.artifacts.mount_path.rstrip("/")
        mounts += [
            {"name": "artifacts", "mountPath": f"{root}/{folder}", "subPath": folder, "readOnly": read_only}
            for folder, read_only in folders.items()
        ]
    if run.step in GPU_STEPS:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": cfg.model_cache_claim, "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": cfg.model_cache_mount_path, "readOnly": True})
    for i, claim in enumerate(run.reference_claims):
        volumes.append({"name": f"ref-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"ref-{i}", "mountPath": f"{REFERENCES_MOUNT}/{claim}", "readOnly": True})
    return volumes, mounts


def _resources(run: Run, cfg: OperatorConfig) -> dict[str, Any]:
    gpu = run.step in GPU_STEPS
    size = cfg.gpu_resources if gpu else cfg.cpu_resources
    requests = {"cpu": size.cpu, "memory": size.memory}
    limits: dict[str, str | int] = {**size.limits()}
    if gpu:
        limits["nvidia.com/gpu"] = max(1, run.gpus)
    return {"requests": requests, "limits": limits}


TERMINATION_GRACE_S = 120


def build_job(run: Run, cfg: OperatorConfig) -> dict[str, Any]:
    volumes, mounts = _volumes(run, cfg)
    labels = dict(run.labels)
    if run.queue_name:
        labels[QUEUE_LABEL] = run.queue_name
        if run.priority_class:
            labels[PRIORITY_LABEL] = run.priority_class
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM on preemption: the trainer finishes its step and writes a checkpoint (seconds for a LoRA and its
        # optimizer state) before this runs out and SIGKILL follows.
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "serviceAccountName": run.runner,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": run.step,
                "image": cfg.runtime_image,
                "imagePullPolicy": cfg.image_pull_policy,
                "command": command(run.step),
                "env": _env(run, cfg),
                "resources": _resources(run, cfg),
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
    }
    if run.step in GPU_STEPS:
        labels[NODE_POOL] = run.node_pool or cfg.default_node_pool
        pool = cfg.node_pools[labels[NODE_POOL]]
        if pool.node_selector:
            pod_spec["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    if run.priority_class and not run.queue_name:
        pod_spec["priorityClassName"] = run.priority_class
    spec: dict[str, Any] = {
        "backoffLimit": cfg.backoff_limit,
        "activeDeadlineSeconds": cfg.active_deadline_seconds,
        # Bad input and a full artifacts volume fail the Job at once (a retry would redo the work to fail the same
        # way); a preempted or evicted pod does not count against backoffLimit.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": run.step, "operator": "In", "values": list(NEVER_RETRIED)},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": dict(run.labels)}, "spec": pod_spec},
    }
    if run.queue_name:
        spec["suspend"] = True  # Kueue admits (unsuspends) it when quota allows.
    meta = _meta(run, run.name, labels)
    if run.generation is not None:
        meta["annotations"] = {GENERATION: str(run.generation)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def build_children(run: Run, cfg: OperatorConfig) -> list[dict[str, Any]]:
    """Every child of a run, in creation order: RBAC and the RunSpec before the Job that needs them."""
    return [*build_rbac(run), build_configmap(run), build_job(run, cfg)]
