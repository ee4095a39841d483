"""fetch(): https with the SSRF guard against a loopback TLS server, object stores through fsspec, pod paths."""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from kleinstyle.contract.runspec import FetchPolicy
from kleinstyle.runtime.fetch import FetchError, classify_address, fetch, parse_cidrs

if TYPE_CHECKING:
    from tests.runtime.conftest import LoopbackServer

# fsspec's mutable protocol table (the public `fsspec.registry` is a read-only view); monkeypatch restores it.
FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry
DEFAULT = FetchPolicy()
LOOPBACK_OK = FetchPolicy(allowed_cidrs=("127.0.0.0/8",), timeout_s=5.0)
BODY = b"\x89PNG fake image body" * 100


def reason_of(source: str, policy: FetchPolicy = DEFAULT, **kwargs: object) -> str:
    with pytest.raises(FetchError) as caught:
        fetch(source, policy, **kwargs)  # type: ignore[arg-type]
    assert caught.value.source == source
    return caught.value.reason


# --- the address policy, as a table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed", "expected"),
    [
        ("127.0.0.1", (), "loopback"),
        ("::1", (), "loopback"),
        ("169.254.169.254", (), "link-local"),  # cloud metadata service
        ("fe80::1", (), "link-local"),
        ("10.1.2.3", (), "private"),
        ("172.16.0.1", (), "private"),
        ("192.168.1.1", (), "private"),
        ("fd00::1", (), "private"),
        ("224.0.0.1", (), "multicast"),
        ("ff02::1", (), "multicast"),
        ("0.0.0.0", (), "unspecified"),
        ("::", (), "unspecified"),
        ("240.0.0.1", (), "reserved"),
        ("100.64.0.1", (), "not public"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", (), "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", (), "link-local"),
        ("64:ff9b::a01:203", (), "private"),  # NAT64 of 10.1.2.3
        ("2002:7f00:1::", (), "loopback"),  # 6to4 wrapping 127.0.0.1
        ("2002:a9fe:a9fe::", (), "link-local"),  # 6to4 wrapping 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:5601:fefe", (), "link-local"),  # Teredo, client 169.254.1.1 inverted
        ("fec0::1", (), "site-local"),
        ("8.8.8.8", (), None),
        ("2001:4860:4860::8888", (), None),
        ("127.0.0.1", ("127.0.0.0/8",), None),
        ("::ffff:10.1.2.3", ("10.0.0.0/8",), None),
        ("10.1.2.3", ("10.9.0.0/16",), "private"),
        ("::1", ("127.0.0.0/8",), "loopback"),
    ],
)
def test_classify_address(address: str, allowed: tuple[str, ...], expected: str | None) -> None:
    assert classify_address(ipaddress.ip_address(address), parse_cidrs(allowed)) == expected


# --- refused before any connection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("https://127.0.0.1/a.png", "address 127.0.0.1 is loopback; not allowed"),
        ("https://[::1]/a.png", "address ::1 is loopback; not allowed"),
        ("https://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is link-local; not allowed"),
        ("https://10.20.30.40:8443/a.png", "address 10.20.30.40 is private; not allowed"),
        ("https://[::ffff:127.0.0.1]/a.png", "is loopback; not allowed"),
        ("https://localhost/a.png", "localhost resolves to"),
        ("http://example.com/a.png", "plain http:// is not allowed; use https://"),
        ("ftp://example.com/a.png", "ftp:// sources are not supported"),
        ("file:///etc/passwd", "file:// sources are not supported"),
        ("images/a.png", "not a URL or an absolute path"),
        ("https://a..b/x.png", "a..b is not a valid host name"),
        ("https:///x.png", "URL has no host"),
    ],
)
def test_refused_sources(source: str, expected: str) -> None:
    assert expected in reason_of(source)


def test_hostname_resolving_to_loopback_is_refused_by_default(https_server: LoopbackServer) -> None:
    https_server.respond("/a.png", body=BODY)
    reason = reason_of(https_server.url("/a.png", host="localhost"))
    assert reason.startswith("localhost resolves to ") and "loopback; not allowed" in reason
    assert https_server.requests == []


# --- https against a loopback TLS server --------------------------------------------------------------------------


def test_fetches_when_allowed_and_keeps_host_and_sni(
    https_server: LoopbackServer, trust_test_ca: ssl.SSLContext
) -> None:
    https_server.respond("/a.png", body=BODY)
    url = https_server.url("/a.png", host="localhost")
    assert fetch(url, LOOPBACK_OK, verify=trust_test_ca) == BODY
    (request,) = https_server.requests
    assert request.headers["Host"] == f"localhost:{https_server.port}"
    assert https_server.server_names == ["localhost"]


def test_tls_is_verified(https_server: LoopbackServer) -> None:
    https_server.respond("/a.png", body=BODY)
    reason = reason_of(https_server.url("/a.png"), LOOPBACK_OK)  # system trust store: the test CA is unknown
    assert reason.startswith("TLS certificate not trusted")


def test_connects_to_the_vetted_address_not_a_second_lookup(
    https_server: LoopbackServer, trust_test_ca: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name answers loopback (allowed) once, then a private address; only the first is used."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def rebinding(host: str, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host == "cdn.kleinstyle.test":
            return real(next(answers, "10.9.9.9"), *args, **kwargs)  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    https_server.respond("/a.png", body=BODY)
    url = https_server.url("/a.png", host="cdn.kleinstyle.test")
    assert fetch(url, LOOPBACK_OK, verify=trust_test_ca) == BODY
    assert https_server.requests[0].headers["Host"] == f"cdn.kleinstyle.test:{https_server.port}"
    assert https_server.server_names == ["cdn.kleinstyle.test"]


def test_follows_redirects_and_rechecks_each_hop(https_server: LoopbackServer, trust_test_ca: ssl.SSLContext) -> None:
    https_server.respond("/a.png", body=BODY)
    https_server.respond("/moved", 302, headers={"Location": "/a.png"})
    https_server.respond("/to-metadata", 302, headers={"Location": "https://169.254.169.254/latest/"})
    https_server.respond("/to-private", 307, headers={"Location": "https://10.0.0.7/a.png"})
    https_server.respond("/to-http", 301, headers={"Location": https_server.url("/a.png").replace("https", "http")})
    https_server.respond("/loop", 302, headers={"Location": "/loop"})

    assert fetch(https_server.url("/moved"), LOOPBACK_OK, verify=trust_test_ca) == BODY
    assert "169.254.169.254 is link-local; not allowed" in reason_of(
        https_server.url("/to-metadata"), LOOPBACK_OK, verify=trust_test_ca
    )
    assert "10.0.0.7 is private; not allowed" in reason_of(
        https_server.url("/to-private"), LOOPBACK_OK, verify=trust_test_ca
    )
    assert "redirected to http://" in reason_of(https_server.url("/to-http"), LOOPBACK_OK, verify=trust_test_ca)
    assert reason_of(https_server.url("/loop"), LOOPBACK_OK, verify=trust_test_ca) == "more than 5 redirects"


def test_http_errors(https_server: LoopbackServer, trust_test_ca: ssl.SSLContext) -> None:
    https_server.respond("/gone", 404, b"not here")
    assert reason_of(https_server.url("/gone"), LOOPBACK_OK, verify=trust_test_ca) == "HTTP 404"
    assert reason_of(https_server.url("/no-route"), LOOPBACK_OK, verify=trust_test_ca) == "HTTP 404"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-content-length"])
def test_oversize_is_refused(https_server: LoopbackServer, trust_test_ca: ssl.SSLContext, declared: bool) -> None:
    policy = FetchPolicy(allowed_cidrs=("127.0.0.0/8",), max_bytes=1000, timeout_s=5.0)
    https_server.respond("/big", body=b"x" * 5000, length=declared)
    https_server.respond("/exact", body=b"y" * 1000, length=declared)
    assert reason_of(https_server.url("/big"), policy, verify=trust_test_ca) == "larger than 1000 bytes"
    assert fetch(https_server.url("/exact"), policy, verify=trust_test_ca) == b"y" * 1000


def test_endless_body_stops_at_the_cap(https_server: LoopbackServer, trust_test_ca: ssl.SSLContext) -> None:
    def endless(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.end_headers()
        while not https_server.stop.is_set():
            request.wfile.write(b"z" * 65536)

    https_server.routes["/endless"] = endless
    policy = FetchPolicy(allowed_cidrs=("127.0.0.0/8",), max_bytes=1_000_000, timeout_s=5.0)
    assert reason_of(https_server.url("/endless"), policy, verify=trust_test_ca) == "larger than 1000000 bytes"


@pytest.mark.parametrize("behaviour", ["stall", "drip"])
def test_timeouts_are_bounded(https_server: LoopbackServer, trust_test_ca: ssl.SSLContext, behaviour: str) -> None:
    def stall(request: BaseHTTPRequestHandler) -> None:
        https_server.stop.wait(10)

    def drip(request: BaseHTTPRequestHandler) -> None:  # each byte well within a read timeout, forever
        request.send_response(200)
        request.end_headers()
        while not https_server.stop.wait(0.05):
            request.wfile.write(b"d")
            request.wfile.flush()

    https_server.routes["/slow"] = stall if behaviour == "stall" else drip
    policy = FetchPolicy(allowed_cidrs=("127.0.0.0/8",), timeout_s=0.5)
    started = time.monotonic()
    assert reason_of(https_server.url("/slow"), policy, verify=trust_test_ca) == "timed out after 0.5 s"
    assert time.monotonic() - started < 2.0


# --- object stores -------------------------------------------------------------------------------------------------


class FakeS3(MemoryFileSystem):
    """An in-memory filesystem answering for s3://, standing in for s3fs behind fsspec's registry."""

    protocol = ("s3",)
    store: dict = {}  # type: ignore[type-arg]  # its own, apart from memory://
    pseudo_dirs = [""]


def test_object_store_through_fsspec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FSSPEC_REGISTRY, "s3", FakeS3)
    monkeypatch.setattr(FakeS3, "store", {})
    fs = FakeS3()
    fs.pipe_file("s3://bucket/a.png", BODY)
    fs.pipe_file("s3://bucket/big.png", b"x" * 2000)
    assert fetch("s3://bucket/a.png", FetchPolicy()) == BODY
    assert reason_of("s3://bucket/missing.png") == "not found"
    assert reason_of("s3://bucket/big.png", FetchPolicy(max_bytes=1000)) == "larger than 1000 bytes"


class RecordingS3(FakeS3):
    options: dict = {}  # type: ignore[type-arg]

    def __init__(self, **options: object) -> None:
        RecordingS3.options = options
        super().__init__()


def test_object_store_sources_never_use_the_pods_own_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FSSPEC_REGISTRY, "s3", RecordingS3)
    monkeypatch.setattr(FakeS3, "store", {})
    FakeS3().pipe_file("s3://bucket/a.png", BODY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "artifact-store-key")  # the operator's, for artifacts only
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "artifact-store-secret")
    assert fetch("s3://bucket/a.png", FetchPolicy()) == BODY
    assert RecordingS3.options == {"anon": True}
    monkeypatch.setenv("KLEINSTYLE_SOURCE_AWS_ACCESS_KEY_ID", "board-key")
    monkeypatch.setenv("KLEINSTYLE_SOURCE_AWS_SECRET_ACCESS_KEY", "board-secret")
    assert fetch("s3://bucket/a.png", FetchPolicy()) == BODY
    assert RecordingS3.options == {"key": "board-key", "secret": "board-secret"}


def test_missing_object_store_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(FSSPEC_REGISTRY, "gs", raising=False)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    reason = reason_of("gs://bucket/a.png")
    assert "gcsfs package, which is not installed" in reason


# --- pod paths -----------------------------------------------------------------------------------------------------


def test_pod_paths_go_through_the_rootfs(rootfs: Path) -> None:
    (rootfs / "boards").mkdir()
    (rootfs / "boards" / "a.png").write_bytes(BODY)
    (rootfs / "boards" / "big.png").write_bytes(b"x" * 2000)
    assert fetch("/boards/a.png", FetchPolicy()) == BODY
    assert reason_of("/boards/big.png", FetchPolicy(max_bytes=1000)) == "larger than 1000 bytes"
    assert reason_of("/boards/../boards/a.png") == "'..' is not allowed in a path"


def test_an_unreadable_pod_path_never_says_what_is_there(rootfs: Path) -> None:
    """Missing, a folder, a FIFO, a path through a file, no permission: one reason, one retry verdict."""
    claim = rootfs / "references" / "refs"
    (claim / "folder").mkdir(parents=True)
    (claim / "a.png").write_bytes(BODY)
    (claim / "locked.png").write_bytes(BODY)
    (claim / "locked.png").chmod(0)
    os.mkfifo(claim / "pipe")
    (claim / "dangling.png").symlink_to(claim / "gone.png")
    sources = ["missing.png", "folder", "pipe", "a.png/inside", "dangling.png"]
    if os.geteuid() != 0:  # root reads a file whatever its mode
        sources.append("locked.png")
    verdicts = set()
    for name in sources:
        with pytest.raises(FetchError) as caught:
            fetch(f"/references/refs/{name}", DEFAULT)
        verdicts.add((caught.value.reason, caught.value.retryable))
    assert verdicts == {("not found or not a readable regular file", True)}


def test_a_pvc_source_is_read_only_inside_its_own_claim(rootfs: Path, tmp_path: Path) -> None:
    """A symlink in a tenant's claim cannot reach another claim's mount, nor anything outside the pod's volumes."""
    refs, other = rootfs / "references" / "refs", rootfs / "references" / "kleinstyle-artifacts"
    refs.mkdir(parents=True)
    (other / "team-b").mkdir(parents=True)
    (other / "team-b" / "001.png").write_bytes(BODY)
    (tmp_path / "outside.png").write_bytes(BODY)
    (refs / "inside.png").write_bytes(BODY)
    (refs / "alias.png").symlink_to("inside.png")
    (refs / "sideways.png").symlink_to("../kleinstyle-artifacts/team-b/001.png")
    (refs / "absolute.png").symlink_to(tmp_path / "outside.png")
    (refs / "nowhere.png").symlink_to(tmp_path / "never-written.png")
    assert fetch("/references/refs/alias.png", DEFAULT) == BODY
    escape = "leads outside its volume /references/refs (through a symlink); not allowed"
    for name in ("sideways.png", "absolute.png", "nowhere.png"):  # whether the target exists or not: one reason
        assert reason_of(f"/references/refs/{name}") == escape
