"""Turn a Pod's first container into a local process: its rootfs folder, volumes, environment and argv, and run it.

Shared by the two kubelets that run pods as processes: the emulator's executor (executor.py) and the node agent of
the real control plane (node_agent.py); each reports what `run_process` saw through its own API client.

Each pod gets `{root}/pods/{namespace}/{pod}/` as its filesystem root: every `volumeMount.mountPath` becomes a
symlink there to a local folder (a PVC is `{root}/volumes/{claimName}`, shared by all pods as a real claim would
be; a `subPath` mount links to that folder inside it, created when missing as the kubelet does), and
`KLEINSTYLE_ROOTFS` names it so the runtime resolves pod paths under it (runtime.paths). A pod path reaches only
what is mounted: the folders between mount points are the pod's own, so a claim's other folders are not there.
What a process cannot be held to: `readOnly` (a local process gets no read-only bind unless its runner makes one in
a private mount namespace, as the node agent does where it may, from `PreparedContainer.mounts`; the end-to-end tests
check that the operator's Jobs leave their read-only inputs as they were), and '..' after a mount point, which the
kernel resolves in the linked folder rather than in the pod (the runtime refuses '..' in the paths it is given). The
process sees a minimal environment plus the pod's, not the operator's: a Job that works here does not lean on a
variable that only the developer's shell has. How it reaches the API is the caller's (`api_env`): the emulator's
plain-http KLEINSTYLE_KUBE_API, or a kubelet's KUBERNETES_SERVICE_HOST/PORT with a projected ServiceAccount token
(`write_token` writes it; the emulator's is a placeholder).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .store import now_rfc3339

ROOTFS_ENV = "KLEINSTYLE_ROOTFS"
KUBE_API_ENV = "KLEINSTYLE_KUBE_API"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
INHERITED_ENV = ("PATH", "HOME", "PYTHONPATH", "LANG")
# The thread pools a CPU limit bounds: OpenMP (torch), MKL, OpenBLAS (numpy) and numexpr each start one per core.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
MAX_MESSAGE_BYTES = 4096  # the kubelet's limit on a termination message

# Reads a ConfigMap or Secret ("configmaps"/"secrets", namespace, name); None when it does not exist.
ObjectReader = Callable[[str, str, str], Awaitable[dict[str, Any] | None]]
# Writes the token a projected `serviceAccountToken` source asks for: (the pod, the source, the file).
TokenWriter = Callable[[dict[str, Any], Mapping[str, Any], Path], Awaitable[None]]


async def placeholder_token(pod: dict[str, Any], source: Mapping[str, Any], target: Path) -> None:
    """The emulator's token: it accepts any bearer, so the file only has to exist."""
    target.write_text("devcluster-token")


class PodSetupError(Exception):
    """The container cannot start yet; the kubelet reports `reason` as the container's waiting state and retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Mount:
    source: Path  # the folder (or file) on this machine
    path: str  # where the pod sees it: its mountPath
    read_only: bool


@dataclass(frozen=True)
class PreparedContainer:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    rootfs: Path
    termination_log: Path  # where the container's terminationMessagePath lands on this machine
    fallback_to_logs: bool  # terminationMessagePolicy: FallbackToLogsOnError
    # What each mount links to on this machine, and whether it is readOnly (a runner that can may hold it to that).
    mounts: tuple[Mount, ...] = ()
    # In an image (in_image): the pod's command and args as written (empty: the image's), and its own variables.
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    own_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    working_dir: str | None = None


def pod_rootfs(root: Path, namespace: str, pod: str) -> Path:
    return root / "pods" / namespace / pod


def _source_files(obj: dict[str, Any], is_secret: bool) -> dict[str, bytes]:
    """The files a ConfigMap or Secret projects: key -> content."""
    if is_secret:
        return {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}
    files = {key: str(value).encode() for key, value in (obj.get("data") or {}).items()}
    files.update({key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()})
    return files


def _write_projection(folder: Path, files: dict[str, bytes], items: Sequence[Mapping[str, Any]] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    selected = {item["path"]: files[item["key"]] for item in items or () if item.get("key") in files}
    for relative, content in (selected if items else files).items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


async def _projection(
    read: ObjectReader, namespace: str, source: Mapping[str, Any], is_secret: bool, folder: Path, volume: str
) -> None:
    name = source.get("secretName" if is_secret else "name") or source.get("name", "")
    plural = "secrets" if is_secret else "configmaps"
    what = "secret" if is_secret else "configmap"
    obj = await read(plural, namespace, name)
    if obj is None:
        if source.get("optional"):
            folder.mkdir(parents=True, exist_ok=True)
            return
        raise PodSetupError(
            "ContainerCreating", f'MountVolume.SetUp failed for volume "{volume}" : {what} "{name}" not found'
        )
    files = _source_files(obj, is_secret)
    missing = [item["key"] for item in source.get("items") or () if item.get("key") not in files]
    if missing and not source.get("optional"):
        raise PodSetupError(
            "ContainerCreating",
            f'MountVolume.SetUp failed for volume "{volume}" : {what} references non-existent config key: {missing[0]}',
        )
    _write_projection(folder, files, source.get("items"))


def _downward_api(pod: dict[str, Any], source: Mapping[str, Any], folder: Path) -> None:
    """A downwardAPI volume or projection: each item's fieldRef as a file (resourceFieldRef is not modelled)."""
    files = {
        item["path"]: _field_ref(pod, item["fieldRef"]["fieldPath"]).encode()
        for item in source.get("items") or ()
        if "fieldRef" in item
    }
    _write_projection(folder, files, None)


async def prepare_volumes(
    pod: dict[str, Any], root: Path, rootfs: Path, read: ObjectReader, write_token: TokenWriter = placeholder_token
) -> dict[str, Path]:
    """Materialise the pod's volumes as local folders: volume name -> folder."""
    namespace = pod["metadata"]["namespace"]
    folders: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        private = rootfs / ".volumes" / name
        if "persistentVolumeClaim" in volume:
            folder = root / "volumes" / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
        elif "configMap" in volume:
            folder = private
            await _projection(read, namespace, volume["configMap"], False, folder, name)
        elif "secret" in volume:
            folder = private
            await _projection(read, namespace, volume["secret"], True, folder, name)
        elif "projected" in volume:
            folder = private
            folder.mkdir(parents=True, exist_ok=True)
            for source in volume["projected"].get("sources") or []:
                if "configMap" in source:
                    await _projection(read, namespace, source["configMap"], False, folder, name)
                elif "secret" in source:
                    await _projection(read, namespace, source["secret"], True, folder, name)
                elif "downwardAPI" in source:
                    _downward_api(pod, source["downwardAPI"], folder)
                elif "serviceAccountToken" in source:
                    token = source["serviceAccountToken"]
                    await write_token(pod, token, folder / token.get("path", "token"))
        elif "downwardAPI" in volume:
            folder = private
            _downward_api(pod, volume["downwardAPI"], folder)
        elif "hostPath" in volume:
            folder = Path(volume["hostPath"]["path"])
        else:  # emptyDir, and anything this executor does not model
            folder = private
            folder.mkdir(parents=True, exist_ok=True)
        folders[name] = folder
    return folders


def mount_volumes(
    container: dict[str, Any],
    rootfs: Path,
    folders: Mapping[str, Path],
    read_only_volumes: frozenset[str] = frozenset(),
) -> tuple[Mount, ...]:
    """Make each `mountPath` (with its `subPath`) a symlink under the rootfs to the volume's folder; return what each
    links to, its path in the pod and whether it is readOnly (or of one of `read_only_volumes`), for a runner that
    can hold it to that."""
    linked: list[Mount] = []
    mounts = sorted(container.get("volumeMounts") or [], key=lambda mount: mount["mountPath"].count("/"))
    for mount in mounts:
        if mount["name"] not in folders:
            raise PodSetupError("CreateContainerConfigError", f'volume "{mount["name"]}" not found in the pod spec')
        source = folders[mount["name"]]
        if mount.get("subPath"):
            sub = PurePosixPath(mount["subPath"])
            if sub.is_absolute() or ".." in sub.parts:  # the API server refuses these; never leave the volume
                raise PodSetupError(
                    "CreateContainerConfigError",
                    f"subPath {mount['subPath']!r} of {mount['mountPath']}: must be a relative path without '..'",
                )
            source = source / sub
            if not source.exists():
                source.mkdir(parents=True, exist_ok=True)  # kubelet creates a missing subPath as a directory
        link = rootfs / mount["mountPath"].strip("/")
        if link == rootfs:
            raise PodSetupError("CreateContainerConfigError", "mounting a volume at / is not supported here")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            # Only a mount nested in another volume can land on existing content; never touch a volume's files.
            raise PodSetupError(
                "CreateContainerConfigError", f"cannot mount {mount['mountPath']}: something already exists there"
            )
        link.symlink_to(source.resolve(), target_is_directory=source.is_dir())
        read_only = bool(mount.get("readOnly")) or mount["name"] in read_only_volumes
        linked.append(Mount(source.resolve(), mount["mountPath"], read_only))
    return tuple(linked)


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, unknown ones left as written, `$$` escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def _field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": pod["spec"].get("nodeName", "devcluster"),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodSetupError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


async def container_env(pod: dict[str, Any], container: dict[str, Any], read: ObjectReader) -> dict[str, str]:
    """The container's own variables: `envFrom` first, then `env` in order (later ones may refer to earlier)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}

    async def lookup(plural: str, ref: Mapping[str, Any], key: str | None) -> dict[str, str] | str | None:
        what = "secret" if plural == "secrets" else "configmap"
        obj = await read(plural, namespace, ref.get("name", ""))
        if obj is None:
            if ref.get("optional"):
                return None
            raise PodSetupError("CreateContainerConfigError", f'{what} "{ref.get("name")}" not found')
        files = {k: v.decode("utf-8", "replace") for k, v in _source_files(obj, plural == "secrets").items()}
        if key is None:
            return files
        if key not in files:
            if ref.get("optional"):
                return None
            raise PodSetupError(
                "CreateContainerConfigError",
                f"couldn't find key {key} in {what.capitalize()} {namespace}/{ref.get('name')}",
            )
        return files[key]

    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for plural, field in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
            if field in source:
                values = await lookup(plural, source[field], None)
                if isinstance(values, dict):
                    env.update({prefix + key: value for key, value in values.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        value_from = var["valueFrom"]
        value: Any = None
        if "secretKeyRef" in value_from:
            value = await lookup("secrets", value_from["secretKeyRef"], value_from["secretKeyRef"].get("key"))
        elif "configMapKeyRef" in value_from:
            value = await lookup("configmaps", value_from["configMapKeyRef"], value_from["configMapKeyRef"].get("key"))
        elif "fieldRef" in value_from:
            value = _field_ref(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            value = None  # resources are not enforced here; the executor's own core share (cpus) stands
        if isinstance(value, str):
            env[name] = value
    return env


def resolve_command(argv: Sequence[str], search_path: str) -> list[str]:
    """Find argv[0] on the search path (the current venv's bin first); an absolute path must exist here."""
    if not argv:
        raise PodSetupError("StartError", "no command: the container has no command and no default was configured")
    program = argv[0]
    if os.sep in program:
        if Path(program).exists():
            return list(argv)
        program = Path(program).name  # an image path such as /usr/local/bin/kleinstyle: look it up by name
    found = shutil.which(program, path=search_path)
    if found is None:
        raise PodSetupError("StartError", f'exec: "{argv[0]}": executable file not found in $PATH')
    return [found, *argv[1:]]


def thread_env(cpus: int) -> dict[str, str]:
    """What bounds a process's thread pools to `cpus` cores, as a CPU limit bounds a container."""
    return dict.fromkeys(THREAD_ENV, str(cpus))


def base_env() -> dict[str, str]:
    """The minimal environment every pod process starts from (plus its own variables)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", os.defpath)])
    return env


async def prepare_container(
    pod: dict[str, Any],
    root: Path,
    read: ObjectReader,
    *,
    api_env: Mapping[str, str],
    default_command: Sequence[str] | None = None,
    cpus: int | None = None,
    write_token: TokenWriter = placeholder_token,
    in_image: bool = False,
) -> PreparedContainer:
    """Lay out the pod's rootfs and compute how to run its first container; raise PodSetupError if it cannot run.

    `api_env`: the variables that tell the process where the API is. `cpus`: the pod's share of this machine's
    cores, given to it as OMP_NUM_THREADS and the like (unless the pod sets them), as a kubelet's CPU limit would
    bound it: without it two torch pods on a 2-core machine each start a thread per core and spend most of their
    time waiting for each other (the demo's two trainings: about 12 s with it, 40-50 s without). `in_image`: the
    container runs from its image (containers.py), so its command is not looked up here and `argv` stays empty."""
    meta = pod["metadata"]
    rootfs = pod_rootfs(root, meta["namespace"], meta["name"])
    (rootfs / "dev").mkdir(parents=True, exist_ok=True)
    container = pod["spec"]["containers"][0]
    folders = await prepare_volumes(pod, root, rootfs, read, write_token)
    claims_read_only = frozenset(
        volume["name"]
        for volume in pod["spec"].get("volumes") or []
        if (volume.get("persistentVolumeClaim") or {}).get("readOnly")
    )
    mounts = mount_volumes(container, rootfs, folders, claims_read_only)
    own = await container_env(pod, container, read)
    pod_env = {**(thread_env(cpus) if cpus else {}), **own, "HOSTNAME": meta["name"], **api_env}
    env = {**base_env(), **pod_env, ROOTFS_ENV: str(rootfs)}
    command = [expand(str(part), own) for part in container.get("command") or []]
    args = [expand(str(part), own) for part in container.get("args") or []]
    argv = [] if in_image else resolve_command([*(command or default_command or []), *args], env["PATH"])
    working_dir = container.get("workingDir")
    cwd = rootfs / working_dir.strip("/") if working_dir else rootfs
    cwd.mkdir(parents=True, exist_ok=True)
    termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG
    return PreparedContainer(
        name=container.get("name", "main"),
        argv=argv,
        env=env,
        cwd=cwd,
        rootfs=rootfs,
        termination_log=rootfs / termination_path.strip("/"),
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        mounts=mounts,
        command=tuple(command),
        args=tuple(args),
        own_env=pod_env,
        working_dir=working_dir,
    )


async def prepare_until_ready(
    prepare: Callable[[], Awaitable[PreparedContainer]],
    waiting: Callable[[PodSetupError], Awaitable[None]],
    retry: float = 0.5,
) -> PreparedContainer | PodSetupError:
    """Set a container up, retrying while it cannot start yet (a Secret or ConfigMap it needs is missing), as the
    kubelet does: `waiting` is told each new reason; a StartError is final and returned for the caller to report."""
    reported = None
    while True:
        try:
            return await prepare()
        except PodSetupError as exc:
            if exc.reason == "StartError":
                return exc
            if exc.message != reported:
                await waiting(exc)
                reported = exc.message
        await asyncio.sleep(retry)


# --- running it ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exited:
    """How a container's process ended: what its `terminated` state reports."""

    exit_code: int
    started: str
    finished: str
    message: str  # the termination message

    @property
    def reason(self) -> str:
        return "Completed" if self.exit_code == 0 else "Error"

    def terminated(self) -> dict[str, Any]:
        state = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "message": self.message,
            "startedAt": self.started,
            "finishedAt": self.finished,
        }
        return {key: value for key, value in state.items() if value not in ("", None)}


def container_status(
    container: Mapping[str, Any],
    state: dict[str, Any],
    *,
    ready: bool = False,
    pid: int | None = None,
    restart_count: int = 0,
    last_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of `status.containerStatuses`, as the kubelet writes it."""
    status: dict[str, Any] = {
        "name": container.get("name", "main"),
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": restart_count,
        "state": state,
    }
    if last_state:
        status["lastState"] = last_state
    if pid is not None:
        status["containerID"] = f"local://{pid}"
    return status


def termination_message(prepared: PreparedContainer, log_path: Path, exit_code: int) -> str:
    """What the container left at its terminationMessagePath (the log's tail under FallbackToLogsOnError)."""
    message = b""
    if prepared.termination_log.is_file():
        message = prepared.termination_log.read_bytes()[-MAX_MESSAGE_BYTES:]
    if not message.strip() and exit_code != 0 and prepared.fallback_to_logs and log_path.is_file():
        message = b"\n".join(log_path.read_bytes().splitlines()[-80:])[-2048:]
    return message.decode("utf-8", "replace")


async def kill_process_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the pod's process group, then SIGKILL after the grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def run_process(
    prepared: PreparedContainer,
    log_path: Path,
    started: Callable[[int, str], Awaitable[None]],
    *,
    kill_grace: float,
    stop: asyncio.Future[float] | None = None,
    wrapper: Sequence[str] = (),
) -> Exited:
    """Run the container's process (its own session, output to `log_path`) until it exits, and say how it ended.

    `started(pid, startedAt)` reports it running. A result set on `stop` is a grace period: the process gets SIGTERM,
    then SIGKILL once it has passed, and its end is reported like any other. Cancelling kills it the same way with
    `kill_grace` and does not wait for a second cancel. `wrapper`: argv that runs the container's argv after it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    begun = now_rfc3339()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *wrapper,
            *prepared.argv,
            env=prepared.env,
            cwd=prepared.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await started(process.pid, begun)
        if stop is None:
            returncode = await process.wait()
        else:
            exited = asyncio.ensure_future(process.wait())
            either: set[asyncio.Future[Any]] = {exited, stop}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await kill_process_group(process, stop.result())
            returncode = await exited
    except BaseException:
        await asyncio.shield(kill_process_group(process, kill_grace))  # a second cancel must not leave it alive
        raise
    exit_code = returncode if returncode >= 0 else 128 - returncode
    message = termination_message(prepared, log_path, exit_code)
    return Exited(exit_code, begun, now_rfc3339(), message)
