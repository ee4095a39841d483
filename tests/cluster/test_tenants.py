"""Tenants as users of the real API server: what Kubernetes' own `edit` and `view` give them once the chart's
tenant roles are aggregated in, and what they do not.

A platform team binds alice to `edit` in team-a, bob to `edit` in team-b and carol to `view` in team-a, one
RoleBinding each (conftest TENANTS). Each signs in with a client certificate of the cluster's CA and a kubeconfig of
their own, so the server authenticates and authorizes every request, kubectl's too, as that user alone. An editor
creates, reads, watches, annotates (the stop) and deletes the four kinds in its namespace; nobody writes a
`/status` (status is the operator's output, and the forged-status attack must stop at RBAC); nobody reads the other
tenant's namespace; a viewer reads and changes nothing; `kubectl auth can-i` says the same as the server does. The
last test shows what RBAC does not stop (docs/threat-model.md).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kleinstyle.contract.pod import STOP_ANNOTATION
from kleinstyle.devcluster.controlplane import RealCluster

from .conftest import REPO
from .rbac import (
    APPLY,
    CUSTOM_KINDS,
    JSON_PATCH,
    KINDS,
    MERGE,
    Identity,
    OperatorProcess,
    Release,
    Tenant,
    group_resource,
    path,
    wait_for,
)

EXAMPLES = {
    "StyleBoard": "styleboard.yaml",
    "StyleLoRA": "stylelora.yaml",
    "GenerationJob": "generationjob.yaml",
    "LoRAFusion": "lorafusion.yaml",
}
# What would make a dependency look done, were status input: a finished phase and a run id.
FORGED = {"phase": "Succeeded", "runHash": "0123456789", "message": "forged"}
EDIT_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
READ_VERBS = ("get", "list", "watch")
OTHER = {"alice": "bob", "bob": "alice"}


def example(kind: str, name: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((REPO / "examples" / EXAMPLES[kind]).read_text(encoding="utf-8"))
    if name:
        obj["metadata"]["name"] = name
    return obj


def admin_create(cluster: RealCluster, kind: str, namespace: str, obj: dict[str, Any]) -> None:
    status, body = cluster.api("POST", path(kind, namespace), obj)
    assert status in (201, 409), body


def watch_first(who: Identity, kind: str, namespace: str | None) -> tuple[int, Any]:
    """A watch as `who`: the status, and the first event (the objects there now come first, as ADDED)."""
    return who.request("GET", path(kind, namespace) + "?watch=true&timeoutSeconds=5", first_line=True)


def status_writes(kind: str, namespace: str, name: str, current: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Every way to write the status subresource: merge, JSON and server-side-apply patches, and a PUT."""
    api_version = KINDS[kind][0]
    applied = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "status": FORGED}
    return [
        ("PATCH", {"status": FORGED}, MERGE),
        ("PATCH", [{"op": "add", "path": "/status", "value": FORGED}], JSON_PATCH),
        ("PATCH", applied, APPLY),
        ("PUT", {**current, "status": FORGED}, "application/json"),
    ]


def assert_status_refused(who: Identity, kind: str, namespace: str, name: str) -> None:
    """Each way to write `/status` is a 403 naming the subresource, and can-i agrees for patch and update."""
    status_path = path(kind, namespace, name, "status")
    _, current = who.request("GET", path(kind, namespace, name))
    for method, body, content_type in status_writes(kind, namespace, name, current):
        query = "?fieldManager=tenant&force=true" if content_type == APPLY else ""
        code, answer = who.request(method, status_path + query, body, content_type=content_type)
        assert code == 403, (method, content_type, answer)
        assert f"{group_resource(kind)[1]}/status" in answer["message"], answer
    for verb in ("patch", "update"):
        assert not who.can_i(verb, kind, namespace, subresource="status", name=name), verb


# --- what the roles are ----------------------------------------------------------------------------------------------


def test_the_aggregated_roles_grant_the_kinds_and_no_status(chart_release: Release) -> None:
    """What the controller-manager aggregated into Kubernetes' roles from the chart: the four kinds for admin and
    edit, read-only for view, nothing on any subresource, no wildcard."""
    plurals = {group_resource(kind)[1] for kind in CUSTOM_KINDS}
    for role, verbs in (("admin", EDIT_VERBS), ("edit", EDIT_VERBS), ("view", READ_VERBS)):
        _, body = chart_release.cluster.api("GET", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}")
        granted = {
            (resource, verb)
            for rule in body["rules"]
            if "kleinstyle.dev" in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule["verbs"]
        }
        assert granted == {(plural, verb) for plural in plurals for verb in verbs}, role


# --- editors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CUSTOM_KINDS)
@pytest.mark.parametrize("user", sorted(OTHER))
def test_an_editor_manages_its_own_objects_but_not_their_status(
    tenants: dict[str, Tenant], user: str, kind: str
) -> None:
    tenant = tenants[user]
    who, ns = tenant.who, tenant.namespace
    obj = example(kind)
    name, plural = obj["metadata"]["name"], group_resource(kind)[1]

    created = who.kubectl("create", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    assert created.returncode == 0, created.stderr
    try:
        code, got = who.request("GET", path(kind, ns, name))
        assert code == 200, got
        code, listed = who.request("GET", path(kind, ns))
        assert code == 200 and name in [item["metadata"]["name"] for item in listed["items"]], listed
        code, event = watch_first(who, kind, ns)
        assert code == 200 and event["type"] == "ADDED" and event["object"]["metadata"]["name"] == name, event

        # The stop: an annotation naming the run, metadata the tenant owns.
        stop = f"{STOP_ANNOTATION}=0123456789: enough"
        annotated = who.kubectl("annotate", f"{plural}.kleinstyle.dev", name, "-n", ns, stop)
        assert annotated.returncode == 0, annotated.stderr
        _, got = who.request("GET", path(kind, ns, name))
        assert got["metadata"]["annotations"][STOP_ANNOTATION] == "0123456789: enough"

        assert_status_refused(who, kind, ns, name)
        # The main endpoint takes the patch but drops status: the CRD's status subresource is on.
        code, patched = who.request("PATCH", path(kind, ns, name), {"status": FORGED}, content_type=MERGE)
        assert code == 200 and "phase" not in (patched.get("status") or {}), patched

        for verb in EDIT_VERBS:
            assert who.can_i(verb, kind, ns), verb
    finally:
        deleted = who.kubectl("delete", f"{plural}.kleinstyle.dev", name, "-n", ns, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
    assert who.request("GET", path(kind, ns, name))[0] == 404


@pytest.mark.parametrize("user", sorted(OTHER))
def test_an_editor_reaches_nothing_in_the_other_tenants_namespace(tenants: dict[str, Tenant], user: str) -> None:
    who, other = tenants[user].who, tenants[OTHER[user]].namespace
    cluster = who.cluster
    admin_create(cluster, "StyleBoard", other, example("StyleBoard", "private"))
    admin_create(
        cluster, "ConfigMap", other, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "private"}}
    )
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "private"}, "stringData": {"key": "value"}}
    admin_create(cluster, "Secret", other, secret)

    for kind in (*CUSTOM_KINDS, "Job", "ConfigMap", "Secret"):
        requests = [
            ("GET", path(kind, other, "private"), None),
            ("GET", path(kind, other), None),
            ("GET", path(kind, other) + "?watch=true", None),
            ("GET", path(kind), None),  # every namespace at once
            ("DELETE", path(kind, other, "private"), None),
            ("POST", path(kind, other), {"apiVersion": KINDS[kind][0], "kind": kind, "metadata": {"name": "planted"}}),
        ]
        for method, url, body in requests:
            code, answer = who.request(method, url, body)
            assert code == 403, (kind, method, url, answer)
        for verb in ("get", "list", "watch", "create", "delete"):
            assert not who.can_i(verb, kind, other), (kind, verb)
        assert not who.can_i("list", kind, None), kind
    # Nor through the other's ServiceAccounts: no token, no impersonation across namespaces.
    assert not who.can_i("create", "ServiceAccount", other, subresource="token")


# --- the forged-status attack ----------------------------------------------------------------------------------------


def test_the_forged_status_attack_is_refused(tenants: dict[str, Tenant]) -> None:
    """alice forges her StyleBoard's status to Succeeded with a run id, so that her StyleLoRA would train on a dataset
    she chose: every write of status is refused, through the API and through kubectl, and status stays empty."""
    alice = tenants["alice"]
    who, ns = alice.who, alice.namespace
    for kind, name in (("StyleBoard", "forged"), ("StyleLoRA", "forged-lora")):
        code, answer = who.request("POST", path(kind, ns), example(kind, name))
        assert code == 201, answer
    try:
        assert_status_refused(who, "StyleBoard", ns, "forged")
        patch = json.dumps({"status": FORGED})
        kubectl = who.kubectl(
            "patch", "styleboard", "forged", "-n", ns, "--subresource=status", "--type=merge", "-p", patch
        )
        assert kubectl.returncode != 0
        # kubectl reads the subresource before it patches: refused already there, as status is for tenants.
        assert 'User "alice" cannot get resource "styleboards/status"' in kubectl.stderr, kubectl.stderr
        # Rewriting the whole object through the main endpoint is accepted, status left out.
        _, current = who.request("GET", path("StyleBoard", ns, "forged"))
        code, replaced = who.request("PUT", path("StyleBoard", ns, "forged"), {**current, "status": FORGED})
        assert code == 200 and not replaced.get("status"), replaced
        _, stored = who.cluster.api("GET", path("StyleBoard", ns, "forged"))
        assert not stored.get("status"), stored
    finally:
        for kind, name in (("StyleBoard", "forged"), ("StyleLoRA", "forged-lora")):
            who.request("DELETE", path(kind, ns, name))


# --- viewers ---------------------------------------------------------------------------------------------------------


def test_a_viewer_reads_the_kinds_and_changes_nothing(tenants: dict[str, Tenant]) -> None:
    carol = tenants["carol"]
    who, ns = carol.who, carol.namespace
    for kind in CUSTOM_KINDS:
        name = f"seen-{kind.lower()}"
        admin_create(who.cluster, kind, ns, example(kind, name))
        assert who.request("GET", path(kind, ns, name))[0] == 200
        assert who.request("GET", path(kind, ns))[0] == 200
        code, event = watch_first(who, kind, ns)
        assert code == 200 and event["type"] == "ADDED", event
        for verb in READ_VERBS:
            assert who.can_i(verb, kind, ns), (kind, verb)

        changes = [
            ("POST", path(kind, ns), example(kind, "planted"), "application/json"),
            ("PATCH", path(kind, ns, name), {"metadata": {"annotations": {STOP_ANNOTATION: "0123456789"}}}, MERGE),
            ("DELETE", path(kind, ns, name), None, "application/json"),
        ]
        for method, url, body, content_type in changes:
            code, answer = who.request(method, url, body, content_type=content_type)
            assert code == 403, (kind, method, answer)
        for verb in ("create", "update", "patch", "delete", "deletecollection"):
            assert not who.can_i(verb, kind, ns), (kind, verb)
        assert_status_refused(who, kind, ns, name)
    # view leaves Secrets out: the API keys a tenant's StyleBoards name.
    assert who.request("GET", path("Secret", ns))[0] == 403


# --- kubectl auth can-i ----------------------------------------------------------------------------------------------

# (user, verb, resource as kubectl names it, subresource, whose namespace, expected answer)
CAN_I = [
    ("alice", "create", "styleboards.kleinstyle.dev", "", "alice", True),
    ("alice", "patch", "styleloras.kleinstyle.dev", "", "alice", True),
    ("alice", "delete", "lorafusions.kleinstyle.dev", "", "alice", True),
    ("alice", "watch", "generationjobs.kleinstyle.dev", "", "alice", True),
    ("alice", "patch", "styleloras.kleinstyle.dev", "status", "alice", False),
    ("alice", "update", "styleboards.kleinstyle.dev", "status", "alice", False),
    ("alice", "get", "styleboards.kleinstyle.dev", "", "bob", False),
    ("alice", "list", "jobs.batch", "", "bob", False),
    ("alice", "get", "configmaps", "", "bob", False),
    ("alice", "get", "secrets", "", "bob", False),
    ("bob", "list", "styleloras.kleinstyle.dev", "", "bob", True),
    ("bob", "patch", "generationjobs.kleinstyle.dev", "status", "bob", False),
    ("bob", "list", "secrets", "", "alice", False),
    ("carol", "list", "styleboards.kleinstyle.dev", "", "carol", True),
    ("carol", "create", "styleboards.kleinstyle.dev", "", "carol", False),
    ("carol", "patch", "lorafusions.kleinstyle.dev", "", "carol", False),
    ("carol", "get", "secrets", "", "carol", False),
]


def test_kubectl_auth_can_i_agrees(tenants: dict[str, Tenant]) -> None:
    """The real kubectl's answers, each also asked by SelfSubjectAccessReview and held against the table above (whose
    rows the requests of the tests above make for real)."""
    by_plural = {group_resource(kind)[1]: kind for kind in KINDS}
    wrong = []
    for user, verb, resource, subresource, whose, expected in CAN_I:
        who, namespace = tenants[user].who, tenants[whose].namespace
        args = ["auth", "can-i", verb, resource, "-n", namespace]
        answer = who.kubectl(*args, *([f"--subresource={subresource}"] if subresource else []))
        said = answer.stdout.strip()
        asked = who.can_i(verb, by_plural[resource.split(".")[0]], namespace, subresource=subresource)
        if (said, asked) != ("yes" if expected else "no", expected):
            wrong.append(f"{user} {verb} {resource}/{subresource} in {namespace}: kubectl {said}, review {asked}")
    assert not wrong, "\n".join(wrong)


# --- what RBAC does not stop -----------------------------------------------------------------------------------------


def test_an_editor_can_write_its_own_objects_status_as_the_runs_service_account(
    tenants: dict[str, Tenant], chart_operator: OperatorProcess
) -> None:
    """`edit` grants `create serviceaccounts/token` (and `impersonate serviceaccounts`) in the namespace, so while a
    run lasts its tenant can act as the run's ServiceAccount, whose Role lets it patch its owner's status. That reach
    ends at the owner (by name), at the namespace and at the run; what the operator acts on is never read from status
    (docs/threat-model.md), and the operator's next reconcile writes its own status back."""
    alice, bob = tenants["alice"], tenants["bob"]
    cluster, ns = alice.who.cluster, alice.namespace
    code, answer = alice.who.request("POST", path("StyleBoard", ns), example("StyleBoard", "runner-probe"))
    assert code == 201, answer
    try:
        runner = "runner-probe-prepare-runner"
        wait_for("the run's ServiceAccount", lambda: cluster.api("GET", path("ServiceAccount", ns, runner))[0] == 200)
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}}
        token_path = path("ServiceAccount", ns, runner, "token")
        assert bob.who.request("POST", token_path, request)[0] == 403
        code, minted = alice.who.request("POST", token_path, request)
        assert code == 201, minted
        as_runner = Identity(cluster, f"system:serviceaccount:{ns}:{runner}", token=minted["status"]["token"])
        wait_for(
            "the run's Role bound",
            lambda: as_runner.can_i("patch", "StyleBoard", ns, subresource="status", name="runner-probe"),
        )

        forged = {"status": FORGED}
        code, answer = as_runner.request(
            "PATCH", path("StyleBoard", ns, "runner-probe", "status"), forged, content_type=MERGE
        )
        assert code == 200, answer
        assert (
            as_runner.request("PATCH", path("StyleBoard", ns, "other", "status"), forged, content_type=MERGE)[0] == 403
        )
        assert as_runner.request("GET", path("Secret", ns))[0] == 403

        def rewritten() -> bool:
            _, board = cluster.api("GET", path("StyleBoard", ns, "runner-probe"))
            return (board.get("status") or {}).get("runHash") != FORGED["runHash"]

        wait_for("the operator's own status written back", rewritten)
    finally:
        alice.who.request("DELETE", path("StyleBoard", ns, "runner-probe"))
        wait_for(
            "the board released by the operator",
            lambda: cluster.api("GET", path("StyleBoard", ns, "runner-probe"))[0] == 404,
        )
    refused = chart_operator.refusals()
    assert not refused, "\n".join(refused)
