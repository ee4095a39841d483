"""Run a pod's container from its image with podman, holding it to the pod's security context, as a kubelet's CRI does.

The node agent (node_agent.py) does this for the images it is told to (`NodeAgent(images=...)`, the ones `make
images` built); any other pod it runs as a local process (pod_setup.py). What a container gets here:
- its image's filesystem, read-only where `readOnlyRootFilesystem` says so (with no tmpfs of podman's own: as in a
  pod, only the volumes are writable), and its image's ENTRYPOINT/CMD unless the pod sets `command`/`args`;
- the user and group the pod or container sets (else the image's; `runAsNonRoot` refused for a root one, with the
  kubelet's message), `fsGroup` as a supplementary group that owns the writable volumes, the capabilities it drops
  and adds, `allowPrivilegeEscalation: false` as no-new-privileges, the RuntimeDefault seccomp profile;
- each volume bind-mounted at its `mountPath` (`:ro` for readOnly), the termination-message file, the pod's
  variables and the API's, and the host's network (loopback is where the control plane listens);
- its CPU limit as thread-pool sizes, as for a process (cgroup limits are not applied: this machine's sandbox may
  refuse them); a GPU limit is not modelled.
`CONTAINERS_CONF` (hack/images/containers.conf) is set for podman: runc, cgroupfs, no default ulimits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .pod_setup import DEFAULT_TERMINATION_LOG, PodSetupError, PreparedContainer

REPO = Path(__file__).resolve().parents[3]  # a checkout: the dev cluster is never a wheel
CONTAINERS_CONF = REPO / "hack" / "images" / "containers.conf"
PODMAN_TIMEOUT = 60.0


def podman_env() -> dict[str, str]:
    """The environment podman itself runs with: this machine's, and the project's containers.conf unless one is set."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman() -> str | None:
    return shutil.which("podman")


def image_present(image: str) -> bool:
    """Whether `image` is in this machine's podman storage (nothing is ever pulled)."""
    tool = podman()
    if tool is None:
        return False
    found = subprocess.run(
        [tool, "image", "exists", image], env=podman_env(), capture_output=True, timeout=PODMAN_TIMEOUT, check=False
    )
    return found.returncode == 0


def image_user(image: str) -> str:
    """The image's USER ("" when it sets none: root)."""
    tool = podman() or "podman"
    inspected = subprocess.run(
        [tool, "image", "inspect", "--format", "{{json .Config.User}}", image],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=PODMAN_TIMEOUT,
        check=True,
    )
    user: str = json.loads(inspected.stdout.strip() or '""')
    return user


def _security(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    """The container's effective security context: its own settings over the pod's."""
    pod_level = dict(pod["spec"].get("securityContext") or {})
    return {**pod_level, **(container.get("securityContext") or {})}


def run_as(pod: Mapping[str, Any], container: Mapping[str, Any], image_user: str) -> str | None:
    """`--user` for the container (None: the image's), refusing a root user under runAsNonRoot as the kubelet does."""
    security = _security(pod, container)
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    if security.get("runAsNonRoot"):
        effective = str(uid) if uid is not None else image_user.split(":", 1)[0]
        name = f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}", container: {container["name"]})'
        if effective in ("", "0", "root"):
            raise PodSetupError(
                "CreateContainerConfigError", f"Error: container has runAsNonRoot and image will run as root {name}"
            )
        if not effective.isdigit():
            raise PodSetupError(
                "CreateContainerConfigError",
                f"Error: container has runAsNonRoot and image has non-numeric user ({effective}), cannot verify user "
                f"is non-root {name}",
            )
    if uid is None:
        return None if gid is None else f"{image_user.split(':', 1)[0] or 0}:{gid}"
    return f"{uid}:{gid}" if gid is not None else str(uid)


def podman_argv(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    run: PreparedContainer,
    *,
    name: str,
    image_user: str,
    tool: str = "podman",
) -> list[str]:
    """The `podman run` that runs `container` of `pod` from its image as `run` (prepared `in_image`) says, under the
    pod's security context (pure): the pod's command and args, variables, mounts and termination-message file."""
    security = _security(pod, container)
    argv = [tool, "run", "--rm", "--name", name, "--pull", "never", "--network", "host", "--stop-timeout", "1"]
    user = run_as(pod, container, image_user)
    if user is not None:
        argv += ["--user", user]
    if security.get("fsGroup") is not None:
        argv += ["--group-add", str(security["fsGroup"])]
    for group in security.get("supplementalGroups") or []:
        argv += ["--group-add", str(group)]
    if security.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if security.get("privileged"):
        argv += ["--privileged"]
    capabilities = security.get("capabilities") or {}
    argv += [arg for cap in capabilities.get("drop") or [] for arg in ("--cap-drop", cap)]
    argv += [arg for cap in capabilities.get("add") or [] for arg in ("--cap-add", cap)]
    if (security.get("seccompProfile") or {}).get("type") == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]
    for mount in run.mounts:
        argv += ["--volume", f"{mount.source}:{mount.path}:{'ro' if mount.read_only else 'rw'}"]
    message_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG
    argv += ["--volume", f"{run.termination_log}:{message_path}:rw"]
    for key, value in sorted(run.own_env.items()):
        argv += ["--env", f"{key}={value}"]
    if run.working_dir:
        argv += ["--workdir", run.working_dir]
    if run.command:
        argv += ["--entrypoint", json.dumps(list(run.command))]
    return [*argv, container["image"], *run.args]


def grant_fs_group(folders: Sequence[Path], group: int) -> None:
    """What the kubelet does for `fsGroup` on the volumes it may change: the group owns every file, may write it, and
    new files inherit the group (setgid folders)."""
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            if path.is_symlink():
                continue
            os.chown(path, -1, group)
            mode = path.stat().st_mode
            os.chmod(path, mode | 0o060 | (0o2010 if path.is_dir() else 0))


def remove(name: str) -> None:
    """Remove container `name` if it is still there (its podman client was killed), stopping it at once."""
    tool = podman()
    if tool is not None:
        subprocess.run(
            [tool, "rm", "--force", "--time", "0", "--ignore", name],
            env=podman_env(),
            capture_output=True,
            timeout=PODMAN_TIMEOUT,
            check=False,
        )
