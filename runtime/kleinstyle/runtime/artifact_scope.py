"""The part of an object store a run may touch: the prefix its namespace's Secret is scoped to.

With an object store as the artifact store, each tenant namespace holds its own Secret (operator config
`artifacts.credentialsSecret`), whose credentials the admin limits to one prefix (an IAM policy) and whose key
`prefix` names it, e.g. s3://bucket/kleinstyle/team-a/. The runtime checks every artifact URI against that prefix
before it opens anything, and the prefix against the run's own namespace folder (`{artifacts.uri}/{namespace}/`): the
operator cannot read Secrets, so a prefix naming another namespace is caught here. A refusal is BadInput (exit 2),
naming the Secret and the prefix. No Secret configured (a PVC, or the pod's own identity): nothing is checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kleinstyle.contract.layout import namespace_folder
from kleinstyle.contract.pod import ARTIFACT_PREFIX_ENV, ARTIFACT_PREFIX_KEY, ARTIFACT_SECRET_ENV
from kleinstyle.contract.runspec import RunSpec

from .errors import BadInput
from .paths import is_object_store


class OutOfScope(BadInput):
    """An artifact URI outside the prefix the namespace's Secret is scoped to, or a prefix outside the namespace."""


@dataclass(frozen=True)
class Scope:
    secret: str
    prefix: str  # ends with "/"

    def check(self, uri: str) -> None:
        """Refuse an object-store `uri` outside the prefix (or with '.' or '..' segments that could leave it)."""
        if not is_object_store(uri):
            return
        inside = uri.startswith(self.prefix) or uri.rstrip("/") == self.prefix.rstrip("/")
        if not inside or {".", ".."} & set(uri.split("/")):
            raise OutOfScope(
                f"{uri} is outside {self.prefix}, the prefix the artifact store's Secret {self.secret} is scoped to"
            )


def scope_from_env(env: Mapping[str, str] | None = None) -> Scope | None:
    """The scope the pod's environment names; None when no artifact Secret is configured."""
    env = os.environ if env is None else env
    secret = env.get(ARTIFACT_SECRET_ENV, "")
    if not secret:
        return None
    prefix = env.get(ARTIFACT_PREFIX_ENV, "").strip()
    if not is_object_store(prefix):
        raise OutOfScope(
            f"the artifact store's Secret {secret} in this namespace needs the key {ARTIFACT_PREFIX_KEY!r}: the "
            f"s3:// or gs:// prefix its credentials are limited to (got {prefix!r})"
        )
    return Scope(secret, prefix.rstrip("/") + "/")


def check_runspec(spec: RunSpec, env: Mapping[str, str] | None = None) -> Scope | None:
    """Refuse (OutOfScope) a run whose Secret's prefix is not inside its namespace's folder of the store, or that
    names an artifact URI outside that prefix; the scope to check later URIs against, None when there is none."""
    scope = scope_from_env(env)
    if scope is None or not is_object_store(spec.output_uri):
        return scope
    folder = namespace_folder(spec.output_uri, spec.owner)
    if folder is None or not scope.prefix.startswith(f"{folder}/"):
        raise OutOfScope(
            f"the artifact store's Secret {scope.secret} is scoped to {scope.prefix}, which is not inside "
            f"{folder}/, this namespace's folder of the store: a namespace's Secret may reach its own artifacts only"
        )
    for uri in [spec.output_uri, *(uri for _, uri in spec.input_uris())]:
        scope.check(uri)
    return scope


def check_uri(uri: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse (OutOfScope) an object-store `uri` outside the pod's scope, before anything opens it."""
    scope = scope_from_env(env)
    if scope is not None:
        scope.check(uri)
