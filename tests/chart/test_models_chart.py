"""The chart's model cache (templates/models.yaml): the claim per namespace and the Job that fills it with
`kleinstyle models pull` (docs/models.md), rendered offline with Helm's SDK and read back through the CLI's own
parser and Kubernetes' schemas."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from kleinstyle.cli import main as cli  # noqa: E402

RELEASE, NAMESPACE = "kleinstyle", "kleinstyle-system"
PULL = {
    "watchNamespaces": ["team-a", "team-b"],
    "models": {
        "createClaim": True,
        "storageClassName": "nfs",
        "pull": {"enabled": True, "tokenSecret": "hub-token", "only": ["klein-base-9b", "csd"], "maxBytes": 10**11},
    },
}


def render(chart, values: dict[str, Any] | None = None) -> list[dict]:
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc for path, text in manifests.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    ]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_nothing_by_default(chart):
    docs = render(chart)
    assert not of_kind(docs, "Job")
    assert not [c for c in of_kind(docs, "PersistentVolumeClaim") if c["metadata"]["name"] == "kleinstyle-models"]


def test_a_claim_and_a_pull_job_per_namespace(chart):
    docs = render(chart, PULL)
    claims = [c for c in of_kind(docs, "PersistentVolumeClaim") if c["metadata"]["name"] == "kleinstyle-models"]
    assert sorted(c["metadata"]["namespace"] for c in claims) == ["team-a", "team-b"]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"] and claims[0]["spec"]["storageClassName"] == "nfs"
    assert claims[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    jobs = of_kind(docs, "Job")
    assert sorted(j["metadata"]["namespace"] for j in jobs) == ["team-a", "team-b"]
    pod = jobs[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "kleinstyle-models"}
    assert volumes["hub-token"]["secret"]["secretName"] == "hub-token"
    assert volumes["hub-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]


def test_the_pull_pod_is_restricted_and_writes_only_the_model_cache(chart):
    pod = of_kind(render(chart, PULL), "Job")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    (box,) = pod["containers"]
    assert box["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    writable = {m["name"] for m in box["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"models", "tmp"}  # the cache, and a size-limited scratch emptyDir
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "1Gi"
    assert not [e for e in box["env"] if "TOKEN" in e["name"]]  # the token is a file from the Secret, never env
    assert not [a for a in box["args"] if a.startswith("hf_")]


def test_the_job_args_are_what_the_cli_parses(chart, monkeypatch):
    from kleinstyle.runtime import commands

    seen = []
    add_args, _ = commands.COMMANDS["models"]
    monkeypatch.setitem(commands.COMMANDS, "models", (add_args, lambda args: seen.append(args) or 0))
    box = of_kind(render(chart, PULL), "Job")[0]["spec"]["template"]["spec"]["containers"][0]
    assert box["command"] == ["kleinstyle"]
    assert cli.main(box["args"]) == 0
    (args,) = seen
    assert args.directory == "/models"  # config.modelCacheMountPath, where the claim is mounted
    assert args.only == ["klein-base-9b", "csd"] and args.max_bytes == 10**11
    assert args.summary == "/dev/termination-log"  # what the pod's status shows of which models are missing
    mount = next(m for m in box["volumeMounts"] if m["name"] == "hub-token")
    assert args.token_file == f"{mount['mountPath']}/token"


def test_the_job_name_follows_its_settings(chart):
    def name(values: dict[str, Any]) -> str:
        return of_kind(render(chart, values), "Job")[0]["metadata"]["name"]

    endpoint = {
        **PULL,
        "models": {**PULL["models"], "pull": {**PULL["models"]["pull"], "endpoint": "https://m.internal"}},
    }
    assert name(PULL) == name(PULL) != name(endpoint)
    assert len(name(PULL)) <= 63


@pytest.mark.parametrize(
    "pull",
    [{"endpoint": "ftp://mirror"}, {"token": "hf_secret"}, {"only": ["../x"]}, {"maxBytes": 0}],
    ids=["endpoint-scheme", "token-in-values", "only-name", "max-bytes"],
)
def test_schema_refuses_bad_pull_values(chart, pull):
    with pytest.raises(helm.HelmError):
        render(chart, {"models": {"pull": {"enabled": True, **pull}}})


@pytest.mark.parametrize("kube_version", ["1.30.0", kubernetes_validate.latest_version()])
def test_manifests_validate_strictly(chart, kube_version):
    docs = [d for d in render(chart, PULL) if d["kind"] in ("Job", "PersistentVolumeClaim")]
    assert len(docs) == 4
    for doc in docs:
        kubernetes_validate.validate(doc, kube_version, strict=True)
