"""The chart's default images are the tags `make images` produces (hack/images/build.sh): a platform team that builds
and pushes them with the defaults installs the chart with no image values at all."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kleinstyle"
BUILD = REPO / "hack" / "images" / "build.sh"


def build_default(variable: str) -> str:
    found = re.search(rf"^{variable}=\$\{{{variable}:-([^}}]+)\}}", BUILD.read_text(encoding="utf-8"), re.M)
    assert found, f"{BUILD} sets no default {variable}"
    return found[1]


def test_the_charts_default_images_are_the_tags_make_images_builds() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    registry = build_default("REGISTRY")
    # The build tags REGISTRY/NAME:VERSION with the package's version; the chart's tags default to its appVersion.
    assert chart["appVersion"] == version
    assert values["image"]["repository"] == f"{registry}/operator" and not values["image"]["tag"]
    assert not values["config"]["runtimeImage"]
    for template in ("_helpers.tpl", "models.yaml"):
        text = (CHART / "templates" / template).read_text(encoding="utf-8")
        assert f'(printf "{registry}/runtime:%s" .Chart.AppVersion)' in text, template
