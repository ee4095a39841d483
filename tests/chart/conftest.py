"""The chart, loaded once per module with Helm's SDK (helm-python-sdk), for every chart test."""

from __future__ import annotations

from pathlib import Path

import pytest

CHART = Path(__file__).resolve().parents[2] / "charts" / "kleinstyle"


@pytest.fixture(scope="module")
def chart():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
    with helm.Chart.load(CHART) as loaded:
        yield loaded
