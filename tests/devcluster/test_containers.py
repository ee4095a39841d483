"""How the node agent runs a pod's container from its image: the `podman run` a pod spec becomes (pure), and the
kubelet's rules it keeps (runAsNonRoot, fsGroup). tests/cluster/test_images.py runs the images so."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.containers import grant_fs_group, podman_argv, run_as
from kleinstyle.devcluster.pod_setup import Mount, PodSetupError, PreparedContainer

pytestmark = pytest.mark.unit


def job_pod(**container: Any) -> dict[str, Any]:
    """A pod as the operator's Jobs make them (operator/children.py): the chart's user, read-only root, no caps."""
    return {
        "metadata": {"name": "bd9-prepare-x", "namespace": "team-a", "uid": "0123456789"},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "prepare",
                    "image": "ghcr.io/kleinstyle/runtime:0.1.0",
                    "command": ["kleinstyle", "prepare"],
                    "args": ["--spec", "/run/kleinstyle/spec.json"],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    **container,
                }
            ],
        },
    }


def prepared(tmp_path: Path, **fields: Any) -> PreparedContainer:
    base: dict[str, Any] = {
        "name": "prepare",
        "argv": [],
        "env": {},
        "cwd": tmp_path,
        "rootfs": tmp_path,
        "termination_log": tmp_path / "dev" / "termination-log",
        "fallback_to_logs": True,
        "mounts": (
            Mount(tmp_path / "volumes" / "artifacts", "/artifacts", False),
            Mount(tmp_path / "volumes" / "refs", "/references/refs", True),
        ),
        "command": ("kleinstyle", "prepare"),
        "args": ("--spec", "/run/kleinstyle/spec.json"),
        "own_env": {"OMP_NUM_THREADS": "1", "KUBERNETES_SERVICE_HOST": "127.0.0.1"},
    }
    return PreparedContainer(**{**base, **fields})


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_a_job_pod_runs_as_its_user_on_a_read_only_root_with_no_capabilities(tmp_path: Path) -> None:
    pod = job_pod()
    argv = podman_argv(pod, pod["spec"]["containers"][0], prepared(tmp_path), name="k8s_x", image_user="1000:1000")

    image = argv.index("ghcr.io/kleinstyle/runtime:0.1.0")
    assert argv[image + 1 :] == ["--spec", "/run/kleinstyle/spec.json"]  # args after the image: its CMD replaced
    assert json.loads(option_values(argv, "--entrypoint")[0]) == ["kleinstyle", "prepare"]
    assert option_values(argv, "--user") == ["1000:1000"]
    assert option_values(argv, "--group-add") == ["1000"]
    # Read-only without podman's own tmpfs mounts: as in a pod, only the volumes can be written.
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert option_values(argv, "--cap-drop") == ["ALL"]
    assert "no-new-privileges" in option_values(argv, "--security-opt")
    assert option_values(argv, "--volume") == [
        f"{tmp_path}/volumes/artifacts:/artifacts:rw",
        f"{tmp_path}/volumes/refs:/references/refs:ro",
        f"{tmp_path}/dev/termination-log:/dev/termination-log:rw",
    ]
    assert sorted(option_values(argv, "--env")) == ["KUBERNETES_SERVICE_HOST=127.0.0.1", "OMP_NUM_THREADS=1"]
    assert option_values(argv, "--pull") == ["never"] and option_values(argv, "--network") == ["host"]


def test_a_container_with_no_command_keeps_the_images_entrypoint(tmp_path: Path) -> None:
    pod = job_pod()
    run = prepared(tmp_path, command=(), args=("operator", "--config", "/etc/kleinstyle/operator.yaml"))
    argv = podman_argv(pod, pod["spec"]["containers"][0], run, name="k8s_x", image_user="1000:1000")
    assert "--entrypoint" not in argv
    assert argv[-4:] == ["ghcr.io/kleinstyle/runtime:0.1.0", "operator", "--config", "/etc/kleinstyle/operator.yaml"]


def test_a_writable_root_and_no_security_context_leave_podmans_defaults(tmp_path: Path) -> None:
    pod = job_pod(securityContext={})
    pod["spec"]["securityContext"] = {}
    argv = podman_argv(pod, pod["spec"]["containers"][0], prepared(tmp_path), name="k8s_x", image_user="")
    assert not {"--read-only", "--user", "--cap-drop", "--group-add"} & set(argv)


@pytest.mark.parametrize(
    ("pod_user", "image_user", "refused"),
    [
        (None, "", "image will run as root"),
        (None, "0:0", "image will run as root"),
        (None, "root", "image will run as root"),
        (None, "kleinstyle", "non-numeric user (kleinstyle)"),
        (0, "1000:1000", "image will run as root"),
    ],
)
def test_run_as_non_root_refuses_a_root_user_as_the_kubelet_does(
    pod_user: int | None, image_user: str, refused: str
) -> None:
    pod = job_pod()
    pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    container = pod["spec"]["containers"][0]
    if pod_user is not None:
        container["securityContext"] = {"runAsUser": pod_user}
    with pytest.raises(PodSetupError) as refusal:
        run_as(pod, container, image_user)
    assert refusal.value.reason == "CreateContainerConfigError" and refused in refusal.value.message
    assert '(pod: "bd9-prepare-x_team-a", container: prepare)' in refusal.value.message


def test_the_images_user_stands_where_the_pod_sets_none() -> None:
    pod = job_pod()
    pod["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsGroup": 2000}
    container = pod["spec"]["containers"][0]
    assert run_as(pod, container, "1000:1000") == "1000:2000"
    pod["spec"]["securityContext"] = {}
    assert run_as(pod, container, "1000:1000") is None


def test_fs_group_owns_and_may_write_every_file_of_a_volume(tmp_path: Path) -> None:
    volume = tmp_path / "artifacts"
    (volume / "runs").mkdir(parents=True)
    (volume / "runs" / "lora.safetensors").write_bytes(b"x")
    (volume / "runs" / "lora.safetensors").chmod(0o600)
    grant_fs_group([volume], os.getgid() if os.getuid() else 1000)
    for path in [volume, volume / "runs", volume / "runs" / "lora.safetensors"]:
        mode = path.stat().st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IWGRP, path
        assert path.stat().st_gid == (os.getgid() if os.getuid() else 1000)
    assert (volume / "runs").stat().st_mode & stat.S_ISGID  # new files there get the group too
