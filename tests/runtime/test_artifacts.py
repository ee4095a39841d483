"""artifact_dir(), write_json_atomic(): whole directories or nothing, on a pod path and on an fsspec store."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from kleinstyle.runtime.artifacts import (
    ArtifactDir,
    artifact_dir,
    is_complete,
    read_json,
    write_json_atomic,
)

URI = "/artifacts/team-a/StyleBoard/watercolor/uid-1"
META = {"step": "prepare", "runspec_hash": "abc"}


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_directory_appears_only_when_complete(rootfs: Path) -> None:
    final = rootfs / URI.lstrip("/")
    with artifact_dir(URI, META) as out:
        out.write_bytes("dataset/001.png", b"png")
        out.write_text("dataset/001.txt", "caption")
        assert not final.exists()
    assert listing(final) == ["_SUCCESS", "dataset/001.png", "dataset/001.txt", "metadata.json"]
    assert read_json(f"{URI}/metadata.json") == META
    assert is_complete(URI)
    assert [p.name for p in final.parent.iterdir()] == ["uid-1"]  # no staging folder left behind


def test_a_failure_leaves_nothing(rootfs: Path) -> None:
    with pytest.raises(RuntimeError), artifact_dir(URI, META) as out:
        out.write_bytes("dataset/001.png", b"png")
        raise RuntimeError("disk full")
    parent = rootfs / URI.lstrip("/")
    assert not parent.exists()
    assert list(parent.parent.iterdir()) == []
    assert not is_complete(URI)


def test_same_run_again_keeps_the_published_directory(rootfs: Path) -> None:
    with artifact_dir(URI, META) as out:
        out.write_text("a.txt", "first")
    again = ArtifactDir(URI, META)
    again.write_text("a.txt", "second")
    assert again.commit() is False
    assert (rootfs / URI.lstrip("/") / "a.txt").read_text() == "first"
    assert len(list((rootfs / URI.lstrip("/")).parent.iterdir())) == 1


def test_a_different_run_replaces_the_directory(rootfs: Path) -> None:
    with artifact_dir(URI, META) as out:
        out.write_text("old.txt", "old")
    with artifact_dir(URI, {**META, "runspec_hash": "def"}) as out:
        out.write_text("new.txt", "new")
    final = rootfs / URI.lstrip("/")
    assert listing(final) == ["_SUCCESS", "metadata.json", "new.txt"]
    assert len(list(final.parent.iterdir())) == 1


def test_names_must_stay_inside(rootfs: Path) -> None:
    out = ArtifactDir(URI, META)
    try:
        for bad in ("../escape.txt", "/etc/passwd", ""):
            with pytest.raises(ValueError):
                out.write_text(bad, "x")
    finally:
        out.discard()


def test_object_store_gets_the_marker_last(memory_store: MemoryFileSystem) -> None:
    uri = "memory://bucket/run-1"
    with artifact_dir(uri, META) as out:
        out.write_bytes("dataset/001.png", b"png")
        assert not memory_store.exists("/bucket/run-1")
    assert memory_store.cat_file("/bucket/run-1/dataset/001.png") == b"png"
    assert read_json(f"{uri}/metadata.json") == META
    assert is_complete(uri)


def test_object_store_upload_failure_leaves_it_incomplete(
    memory_store: MemoryFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploaded: list[str] = []
    original = MemoryFileSystem.put_file

    def flaky(self: MemoryFileSystem, lpath: str, rpath: str, **kwargs: object) -> None:
        if len(uploaded) == 2:
            raise OSError("connection reset")
        uploaded.append(rpath)
        original(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", flaky)
    uri = "memory://bucket/run-2"
    with pytest.raises(OSError), artifact_dir(uri, META) as out:
        for index in range(4):
            out.write_bytes(f"dataset/{index:03d}.png", b"png")
    assert len(uploaded) == 2
    assert not is_complete(uri)


@pytest.mark.parametrize("remote", [False, True])
def test_write_json_atomic(rootfs: Path, memory_store: MemoryFileSystem, remote: bool) -> None:
    uri = "memory://bucket/status.json" if remote else "/artifacts/status.json"
    write_json_atomic(uri, {"n": 1})
    write_json_atomic(uri, {"n": 2})
    assert read_json(uri) == {"n": 2}
    if not remote:
        assert [p.name for p in (rootfs / "artifacts").iterdir()] == ["status.json"]


def test_an_object_store_file_is_copied_to_open_by_path(memory_store, tmp_path: Path) -> None:
    from kleinstyle.runtime.artifacts import local_copy

    memory_store.pipe_file("/bucket/loras/ink.safetensors", b"weights")
    copy = local_copy("memory://bucket/loras/ink.safetensors", tmp_path / "scratch", "0-ink.safetensors")
    assert copy.read_bytes() == b"weights" and copy.parent == tmp_path / "scratch"


def test_a_google_key_in_an_env_var_becomes_a_private_credentials_file(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from kleinstyle.runtime.paths import google_credentials_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = {"GOOGLE_APPLICATION_CREDENTIALS_JSON": '{"type": "service_account"}'}
    path = google_credentials_file(env)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == str(path) and path.read_text() == '{"type": "service_account"}'
    assert path.stat().st_mode & 0o777 == 0o600
    assert (
        google_credentials_file({"GOOGLE_APPLICATION_CREDENTIALS": "/x", "GOOGLE_APPLICATION_CREDENTIALS_JSON": "{}"})
        is None
    )
