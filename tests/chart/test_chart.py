"""The Helm chart, rendered offline with the Helm 4 SDK (helm-python-sdk) and checked against the operator's code.

What the operator does is read from the code itself (its config model, the kinds it creates, the Role it hands to
each Job), so the chart cannot drift from it unnoticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from kleinstyle.cli import main as cli  # noqa: E402
from kleinstyle.contract.runspec import ImageInput, Owner, PrepareSpec, RunSpec  # noqa: E402
from kleinstyle.operator import commands as operator_commands  # noqa: E402
from kleinstyle.operator import kueue  # noqa: E402
from kleinstyle.operator.api import KINDS  # noqa: E402
from kleinstyle.operator.children import Run, build_rbac  # noqa: E402
from kleinstyle.operator.config import OperatorConfig  # noqa: E402
from kleinstyle.operator.indexes import CHILD_KINDS  # noqa: E402
from kleinstyle.operator.kube import PLURALS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kleinstyle"
RELEASE, NAMESPACE = "kleinstyle", "kleinstyle-system"
# The chart's kubeVersion floor (CEL rules with fieldPath/reason in the CRDs are GA from 1.30) and the newest schemas.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def render(chart, values: dict[str, Any] | None = None) -> list[dict]:
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def only(docs: list[dict], kind: str) -> dict:
    """The one `kind` of the operator's own (not the tenant roles aggregated into Kubernetes' edit and view)."""
    found = [d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith(("-edit", "-view"))]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def operator_config(docs: list[dict]) -> OperatorConfig:
    return OperatorConfig.model_validate(yaml.safe_load(only(docs, "ConfigMap")["data"]["operator.yaml"]))


def container(docs: list[dict]) -> dict:
    return only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def api_group(kind: str) -> str:
    api_version = PLURALS[kind][0]
    return api_version.split("/")[0] if "/" in api_version else ""


def needed_grants() -> set[tuple[str, str, str]]:
    """Every call the operator makes, from the code's own tables (kube.py, indexes.py) plus kopf's."""
    verbs = ("get", "list", "watch", "create", "delete")  # indexes watch; a create that finds one gets it
    needed = {(api_group(k), PLURALS[k][1], v) for k in CHILD_KINDS for v in verbs}
    # The runs' pods index and the Workload index; `get`: relists.py reads an entry a relist did not bring.
    needed |= {("", "pods", v) for v in ("get", "list", "watch")}
    needed.add(("batch", "jobs", "patch"))  # Kube.annotate: the spec generation a Job runs for
    needed |= {(kueue.GROUP, "workloads", v) for v in ("get", "list", "watch")}
    needed.add(("", "events", "create"))  # kopf.event
    for kind in KINDS:
        needed |= {("kleinstyle.dev", kind.plural, v) for v in ("get", "list", "watch", "patch")}
        needed.add(("kleinstyle.dev", f"{kind.plural}/status", "patch"))
    return needed


def job_role_rules(kind) -> list[dict]:
    """The rules of the Role the operator creates for a run of `kind` (children.build_rbac)."""
    owner = Owner(kind=kind.kind, plural=kind.plural, namespace="team-a", name="x", uid="u")
    work = PrepareSpec(trigger_word="t", images=(ImageInput(source="https://example.com/a.png"),))
    run = Run(
        runspec=RunSpec(owner=owner, output_uri="", output_display_uri="", work=work),
        step="prepare",
        run_hash="0" * 16,
        owner_api_version="kleinstyle.dev/v1alpha1",
    )
    return next(obj for obj in build_rbac(run) if obj["kind"] == "Role")["rules"]


# --- rendering and lint ----------------------------------------------------------------------------------------


def test_default_render_is_cluster_wide_with_metrics(chart):
    docs = render(chart)
    kinds = sorted(d["kind"] for d in docs)
    roles = ["ClusterRole"] * 3  # the operator's, and the tenants' edit and view
    policy = ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]  # the operator's own writes
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "ServiceAccount", *roles, "ClusterRoleBinding", "Service", *policy]
    )
    args = container(docs)["args"]
    assert args[:3] == ["operator", "--config", "/etc/kleinstyle/operator.yaml"]
    assert "--namespace" not in args


def test_lint_is_clean(chart):
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_config_is_the_operators_default():
    """values.yaml's `config` spells out OperatorConfig's defaults, and the schema knows exactly its keys."""
    with helm.Chart.load(CHART) as loaded:
        docs = render(loaded)
        schema_keys = set(loaded.schema["properties"]["config"]["properties"])
    assert operator_config(docs) == OperatorConfig()
    assert schema_keys == {field.alias for field in OperatorConfig.model_fields.values()}


def test_crds_come_from_the_generated_folder(chart, tmp_path):
    """crds/ is a symlink to the repository's generated CRDs; Helm follows it, packaging included."""
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    if not generated:
        pytest.skip("crds/ not generated yet")
    assert (CHART / "crds").is_symlink()
    assert sorted(Path(c["filename"]).name for c in chart.crds) == generated
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert sorted(Path(c["filename"]).name for c in packaged.crds) == generated


# --- values schema ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"resyncSeconds": "fast"}},
        {"config": {"cpuResources": {"cpu": 2, "memory": "4Gi"}}},  # the operator wants a string quantity
        {"config": {"defaultBackend": "diffusers"}},
        {"config": {"artifacts": {"uri": ""}}},  # "" would send runs to an unmounted path
        {"config": {"unknownKey": 1}},
        {"config": {"metricsPort": 8081}},  # the liveness port
        {"watchNamespaces": ["Team_A"]},
        {"replicas": 2},
    ],
    ids=lambda v: yaml.safe_dump(v, default_flow_style=True).strip(),
)
def test_schema_refuses_bad_values(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        render(chart, values)


def test_default_node_pool_must_exist(chart):
    with pytest.raises(helm.HelmError, match="defaultNodePool"):
        render(chart, {"config": {"defaultNodePool": "a100"}})


# --- security --------------------------------------------------------------------------------------------------


def test_pod_is_restricted(chart):
    docs = render(chart)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(docs)["securityContext"]
    assert ctx == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {m["mountPath"] for m in container(docs)["volumeMounts"]} == {"/etc/kleinstyle", "/tmp"}
    assert container(docs)["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8081} in container(docs)["ports"]


def test_one_replica_never_two_at_once(chart):
    spec = only(render(chart), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_rbac_is_exactly_what_the_operator_calls(chart):
    rules = only(render(chart), "ClusterRole")["rules"]
    held = grants(rules)
    assert not any("*" in item for item in held)
    assert not any(resource == "secrets" for _, resource, _ in held)
    assert needed_grants() <= held
    # Beyond the calls: get on /status and update on /finalizers (see templates/_helpers.tpl for why).
    extra = {(g, r, v) for g, r, v in held - needed_grants()}
    assert extra == {("kleinstyle.dev", f"{k.plural}/status", "get") for k in KINDS} | {
        ("kleinstyle.dev", f"{k.plural}/finalizers", "update") for k in KINDS
    }


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_operator_may_grant_the_job_role(chart, kind):
    """RBAC escalation prevention: the operator can create a Role only with rules it holds itself."""
    held = grants(only(render(chart), "ClusterRole")["rules"])
    assert grants(job_role_rules(kind)) <= held


def test_watched_namespaces_get_roles_not_cluster_roles(chart):
    docs = render(chart, {"watchNamespaces": ["team-a", "team-b"], "rbac": {"tenantRoles": False}})
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    assert needed_grants() <= grants(roles[0]["rules"])
    assert container(docs)["args"][-4:] == ["--namespace", "team-a", "--namespace", "team-b"]


def test_container_args_are_what_the_cli_parses(chart, monkeypatch):
    seen = []
    add_args, _ = operator_commands.COMMANDS["operator"]
    monkeypatch.setitem(operator_commands.COMMANDS, "operator", (add_args, lambda args: seen.append(args) or 0))
    assert cli.main(container(render(chart, {"watchNamespaces": ["team-a", "team-b"]}))["args"]) == 0
    assert seen[0].namespace == ["team-a", "team-b"]
    assert seen[0].config == "/etc/kleinstyle/operator.yaml"
    assert seen[0].liveness == "http://0.0.0.0:8081/healthz"


# --- options ---------------------------------------------------------------------------------------------------


def test_artifacts_mounted_into_the_operator_only_for_delete_on_a_pvc(chart):
    docs = render(chart, {"config": {"artifactsLocalPath": "/artifacts"}, "artifacts": {"operatorClaimName": "shared"}})
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    assert {"name": "artifacts", "mountPath": "/artifacts"} in container(docs)["volumeMounts"]
    assert operator_config(docs).artifacts_local_path == "/artifacts"
    with pytest.raises(helm.HelmError, match="operatorClaimName"):  # no silent guess at a claim that sees it all
        render(chart, {"config": {"artifactsLocalPath": "/artifacts"}})

    on_s3 = {"config": {"artifactsLocalPath": "/artifacts", "artifacts": {"uri": "s3://bucket/ks"}}}
    docs = render(chart, on_s3)
    assert all(v["name"] != "artifacts" for v in only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"])


def test_artifact_claim_per_watched_namespace(chart):
    docs = render(chart, {"watchNamespaces": ["team-a", "team-b"], "artifacts": {"createClaim": True}})
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert sorted(c["metadata"]["namespace"] for c in claims) == ["team-a", "team-b"]
    assert {c["metadata"]["name"] for c in claims} == {"kleinstyle-artifacts"}
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_metrics_off_drops_the_service_and_refuses_a_service_monitor(chart):
    docs = render(chart, {"config": {"metricsPort": 0}})
    assert not [d for d in docs if d["kind"] == "Service"]
    with pytest.raises(helm.HelmError, match="metricsPort"):
        render(chart, {"config": {"metricsPort": 0}, "metrics": {"serviceMonitor": {"enabled": True}}})


def test_service_monitor_scrapes_the_metrics_service(chart):
    docs = render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor, service = only(docs, "ServiceMonitor"), only(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    assert service["spec"]["ports"][0]["port"] == 8080


# --- the manifests against the Kubernetes API schemas ----------------------------------------------------------

EVERYTHING = {
    "watchNamespaces": ["team-a"],
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "dashboard": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
    "config": {"artifactsLocalPath": "/artifacts"},
    "artifacts": {"createClaim": True, "storageClassName": "nfs", "operatorClaimName": "kleinstyle-artifacts-all"},
    "imagePullSecrets": [{"name": "registry"}],
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["default", "everything"])
def test_manifests_validate_strictly(chart, values, kube_version):
    docs = render(chart, values)
    crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    checked = 0
    for doc in docs + crds:
        if doc["kind"] in ("ServiceMonitor", "PrometheusRule"):  # Prometheus Operator kinds (test_monitoring.py)
            continue
        kubernetes_validate.validate(doc, kube_version, strict=True)
        checked += 1
    assert checked >= 6


def test_tenant_roles_aggregate_into_edit_and_view_and_grant_no_status(chart):
    roles = {d["metadata"]["name"]: d for d in render(chart) if d["kind"] == "ClusterRole"}
    edit = next(r for name, r in roles.items() if name.endswith("-edit"))
    view = next(r for name, r in roles.items() if name.endswith("-view"))
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for role in (edit, view):
        held = grants(role["rules"])
        assert {resource for _, resource, _ in held} == {k.plural for k in KINDS}  # no */status, no children
    assert ("kleinstyle.dev", "styleloras", "patch") in grants(edit["rules"])  # the stop annotation
    assert {verb for _, _, verb in grants(view["rules"])} == {"get", "list", "watch"}
    assert not [
        d
        for d in render(chart, {"rbac": {"create": True, "tenantRoles": False}})
        if d["metadata"]["name"].endswith("-edit")
    ]
