"""Fetch one reference image into memory, refusing what a Job inside the cluster must not reach.

A StyleBoard lists URLs chosen by a tenant, and the prepare Job runs inside the cluster network, so every https hop
is a server-side request forgery risk: the cloud metadata service (169.254.169.254), the API server, other tenants'
services. Each hop's host is resolved once, every address is checked against the policy, and the connection goes to
the vetted address itself (Host header and TLS SNI keep the original name), so a DNS answer that changes between the
check and the connect (DNS rebinding) cannot redirect it. Plain http is refused: a tenant's images travel over TLS.

Sources: `https://` (httpx), `s3://` and `gs://` (fsspec, with the board's credentials or anonymous), and absolute
paths in the pod (a mounted volume, read through `local_path`). Everything is capped at `FetchPolicy.max_bytes`
while it streams, so a huge or endless response never sits in memory. A path is read only inside the volume it names
(a pvc:// source: its claim's mount, REFERENCES_MOUNT/CLAIM), and every reason it cannot be read is the same one, so
a rejection never tells whether something exists there or what it is.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import PurePosixPath

import httpx
from kleinstyle.contract.pod import REFERENCES_MOUNT
from kleinstyle.contract.pod import SOURCE_CREDENTIAL_ENV as SOURCE_ENV
from kleinstyle.contract.runspec import FetchPolicy

from .paths import local_path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "kleinstyle-prepare"
# fsspec protocol -> the package that implements it (the `cloud` extra).
OBJECT_STORE_PACKAGES = {"s3": "s3fs", "gs": "gcsfs"}
# IPv6 forms that carry an IPv4 address are judged by the IPv4 address they reach: NAT64 (last 32 bits),
# 6to4 (bits 16-48) and Teredo (the client address, inverted, in the last 32 bits).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
# Deprecated site-local space: still routed internally by some networks; Python's is_global may not flag it.
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
# s3:// and gs:// sources are read with these credentials (from the board's storageSecret) or anonymously, never
# with the node's or the pod's own identity, which may reach other tenants' objects.
SOURCE_CREDENTIAL_ENV = {
    "s3": (SOURCE_ENV["AWS_ACCESS_KEY_ID"], SOURCE_ENV["AWS_SECRET_ACCESS_KEY"]),
    "gs": (SOURCE_ENV["GOOGLE_APPLICATION_CREDENTIALS_JSON"],),
}
_REASON_MAX = 200
# Why a pod path cannot be read, whatever the cause: missing, a folder, a FIFO, a device, no permission.
UNREADABLE = "not found or not a readable regular file"


class FetchError(Exception):
    """A source that could not be fetched; `reason` is short and meant for the user (a StyleBoard rejection).
    `retryable`: whether trying again could help (a timeout, a 503), not a refusal by policy or a 404."""

    def __init__(self, source: str, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.retryable = retryable


def fetch(source: str, policy: FetchPolicy, *, verify: ssl.SSLContext | None = None) -> bytes:
    """Return the bytes of one image source, or raise FetchError.

    `verify` is the TLS trust for https; None means the system default (certifi, or SSL_CERT_FILE when set).
    Tests pass a context that trusts their own CA; verification itself is never turned off.
    """
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme == "https":
        return _fetch_https(source, policy, verify)
    if scheme in OBJECT_STORE_PACKAGES:
        return _fetch_object(source, scheme, policy.max_bytes)
    if scheme == "http":
        raise FetchError(source, "plain http:// is not allowed; use https://")
    if scheme:
        raise FetchError(source, f"{scheme}:// sources are not supported; use https://, s3://, gs:// or a pod path")
    if source.startswith("/"):
        return _read_pod_file(source, policy.max_bytes)
    raise FetchError(source, "not a URL or an absolute path")


# --- address policy (pure) -------------------------------------------------------------------------------------


def parse_cidrs(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse `FetchPolicy.allowed_cidrs`; host bits are tolerated (10.1.2.3/8 means 10.0.0.0/8)."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def classify_address(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why a connection to `address` is refused ("loopback", "private", ...), or None when it is allowed.

    Only globally routable addresses are allowed, unless an admin listed the address in `allowed` (an in-cluster
    image mirror, say). IPv4-mapped and NAT64 IPv6 addresses are judged by the IPv4 address they reach.
    """
    effective: IPAddress = address
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            effective = address.ipv4_mapped
        elif address in _NAT64:
            effective = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address in _6TO4:
            effective = ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
        elif address in _TEREDO:
            effective = ipaddress.IPv4Address(~int(address) & 0xFFFFFFFF)
    if any(address in net or effective in net for net in allowed):
        return None
    if address in _SITE_LOCAL:
        return "site-local"
    checks = (
        ("unspecified", effective.is_unspecified),
        ("loopback", effective.is_loopback),
        ("link-local", effective.is_link_local),
        ("multicast", effective.is_multicast),
        ("reserved", effective.is_reserved),
        ("private", effective.is_private),
        ("not public", not effective.is_global),
    )
    return next((label for label, hit in checks if hit), None)


def pick_address(host: str, addresses: Sequence[IPAddress], allowed: Sequence[IPNetwork]) -> IPAddress:
    """The first allowed address of `host`; raises ValueError with a user-facing reason when none is."""
    refusals: list[tuple[IPAddress, str]] = []
    for address in addresses:
        label = classify_address(address, allowed)
        if label is None:
            return address
        refusals.append((address, label))
    if not refusals:
        raise ValueError(f"{host} has no address")
    address, label = refusals[0]
    if _is_ip_literal(host):
        raise ValueError(f"address {address} is {label}; not allowed")
    raise ValueError(f"{host} resolves to {address}, which is {label}; not allowed")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- https -----------------------------------------------------------------------------------------------------


def _fetch_https(source: str, policy: FetchPolicy, verify: ssl.SSLContext | None) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    try:
        allowed = parse_cidrs(policy.allowed_cidrs)
    except ValueError as exc:
        raise FetchError(source, f"the cluster's allowed_cidrs setting is invalid: {exc}") from None
    context = verify if verify is not None else httpx.create_ssl_context()
    try:
        url = httpx.URL(source)
    except httpx.InvalidURL as exc:
        raise FetchError(source, f"not a valid URL: {exc}") from None
    for _hop in range(MAX_REDIRECTS + 1):
        if url.scheme != "https":
            raise FetchError(source, f"redirected to {url.scheme}://, which is not allowed; only https://")
        host = url.raw_host.decode("ascii")
        if not host:
            raise FetchError(source, "URL has no host")
        port = url.port or 443
        try:
            addresses = _resolve(host, port, _remaining(source, deadline, policy))
        except ValueError as exc:
            raise FetchError(source, str(exc), retryable=True) from None  # DNS may answer next time
        try:
            address = pick_address(host, addresses, allowed)
        except ValueError as exc:
            raise FetchError(source, str(exc)) from None  # refused by policy: no retry changes that
        outcome = _get_pinned(source, url, address, context, policy, deadline)
        if isinstance(outcome, bytes):
            return outcome
        url = outcome
    raise FetchError(source, f"more than {MAX_REDIRECTS} redirects")


def _resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    """All addresses of `host`, in the resolver's order; a literal address is returned as is."""
    if _is_ip_literal(host):
        return [ipaddress.ip_address(host)]
    # getaddrinfo has no timeout of its own; a stuck resolver must not hold the Job past the policy's timeout.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        infos = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout=timeout_s)
    except FutureTimeout:
        raise ValueError(f"resolving {host} timed out") from None
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    except UnicodeError:
        raise ValueError(f"{host} is not a valid host name") from None
    finally:
        pool.shutdown(wait=False)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # Drop an IPv6 scope id ("fe80::1%eth0"); the address itself decides.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _get_pinned(
    source: str,
    url: httpx.URL,
    address: IPAddress,
    context: ssl.SSLContext,
    policy: FetchPolicy,
    deadline: float,
) -> bytes | httpx.URL:
    """One GET to `address`, speaking to `url`'s host: the body, or where a redirect points; anything else raises.

    A fresh client per hop: a pooled connection verified for one name must not carry a request for another.
    """
    host = url.raw_host.decode("ascii")
    timeout = httpx.Timeout(_remaining(source, deadline, policy))
    with httpx.Client(verify=context, trust_env=False, follow_redirects=False, timeout=timeout) as client:
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity", "User-Agent": USER_AGENT},
            extensions={"sni_hostname": host},
        )
        try:
            response = client.send(request, stream=True)
            try:
                return _read_response(source, url, response, policy, deadline)
            finally:
                response.close()
        except httpx.TimeoutException:
            raise FetchError(source, f"timed out after {policy.timeout_s:g} s", retryable=True) from None
        except httpx.HTTPError as exc:
            raise FetchError(source, _transport_reason(exc), retryable=True) from None


def _read_response(
    source: str, url: httpx.URL, response: httpx.Response, policy: FetchPolicy, deadline: float
) -> bytes | httpx.URL:
    status = response.status_code
    if status in REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise FetchError(source, f"HTTP {status} without a Location header")
        try:
            return url.join(location)
        except httpx.InvalidURL:
            raise FetchError(source, f"HTTP {status} to an invalid URL") from None
    if status != 200:
        # A server error or a rate limit may pass; a 403 or 404 will not.
        raise FetchError(source, f"HTTP {status}", retryable=status >= 500 or status in (408, 429))
    too_big = f"larger than {policy.max_bytes} bytes"
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(source, too_big)
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > policy.max_bytes:
            raise FetchError(source, too_big)
        if time.monotonic() > deadline:
            raise FetchError(source, f"timed out after {policy.timeout_s:g} s", retryable=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _remaining(source: str, deadline: float, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(source, f"timed out after {policy.timeout_s:g} s", retryable=True)
    return left


def _transport_reason(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"TLS certificate not trusted: {_short(text)}"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect: {_short(text)}"
    return f"download failed: {_short(text)}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


# --- object stores and pod paths ------------------------------------------------------------------------------


def source_storage_options(scheme: str, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """fsspec options for a user's s3/gs source: the board's own credentials, or anonymous access."""
    env = os.environ if env is None else env
    if scheme == "s3":
        key, secret = (env.get(name, "") for name in SOURCE_CREDENTIAL_ENV["s3"])
        return {"key": key, "secret": secret} if key and secret else {"anon": True}
    token = env.get(SOURCE_CREDENTIAL_ENV["gs"][0], "")
    return {"token": json.loads(token)} if token else {"token": "anon"}


def _fetch_object(source: str, scheme: str, max_bytes: int) -> bytes:
    """Read an s3:// or gs:// object with fsspec, with the board's credentials or anonymously (never the pod's)."""
    import fsspec

    package = OBJECT_STORE_PACKAGES[scheme]
    try:
        fs = fsspec.get_filesystem_class(scheme)(**source_storage_options(scheme))
    except ImportError:
        raise FetchError(
            source, f"reading {scheme}:// needs the {package} package, which is not installed (kleinstyle[cloud])"
        ) from None
    except ValueError as exc:
        raise FetchError(source, f"bad storage credentials: {_short(str(exc))}") from None
    too_big = f"larger than {max_bytes} bytes"
    try:
        size = fs.size(source)
        if size is not None and size > max_bytes:
            raise FetchError(source, too_big)
        with fs.open(source, "rb") as handle:
            data: bytes = handle.read(max_bytes + 1)
    except FetchError:
        raise
    except FileNotFoundError:  # may still be uploading: worth a retry
        raise FetchError(source, "not found", retryable=True) from None
    except PermissionError:
        raise FetchError(source, "access denied") from None
    except Exception as exc:  # object-store clients raise their own types; one image must not crash the run
        reason = f"could not read: {_short(str(exc) or type(exc).__name__)}"
        raise FetchError(source, reason, retryable=True) from None  # a network or service error may pass
    if len(data) > max_bytes:
        raise FetchError(source, too_big)
    return data


def volume_root(source: str) -> str:
    """The mount a pod path `source` names: REFERENCES_MOUNT/CLAIM for a pvc:// source, else its top folder."""
    parts = PurePosixPath(source).parts
    depth = 3 if PurePosixPath(*parts[:2]) == PurePosixPath(REFERENCES_MOUNT) else 2
    return str(PurePosixPath(*parts[:depth]))


def _read_pod_file(source: str, max_bytes: int) -> bytes:
    """Read a regular file (not /dev/zero, not a FIFO) on a volume mounted into the pod, only inside the volume it
    names: never through '..', nor through a symlink that leads out of it. Whatever else goes wrong reads as
    UNREADABLE (retryable: a file may still be being copied there)."""
    if ".." in PurePosixPath(source).parts:
        raise FetchError(source, "'..' is not allowed in a path")
    root = local_path(volume_root(source)).resolve()
    real = local_path(source).resolve()  # symlinks followed as far as they go, without touching the target
    if not real.is_relative_to(root):
        raise FetchError(source, f"leads outside its volume {volume_root(source)} (through a symlink); not allowed")
    too_big = f"larger than {max_bytes} bytes"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the path was just resolved.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        raise FetchError(source, UNREADABLE, retryable=True) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(source, UNREADABLE, retryable=True)
        if info.st_size > max_bytes:
            raise FetchError(source, too_big)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError:
        raise FetchError(source, UNREADABLE, retryable=True) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FetchError(source, too_big)
    return data
