"""The chart's logLevel and logFormat reach `kleinstyle operator` as flags it parses; anything else is refused."""

from __future__ import annotations

import pytest

from tests.support.operator_args import operator_args

from .test_chart import container, helm, render


@pytest.mark.parametrize(
    ("values", "expected"), [({}, ("INFO", "json")), ({"logLevel": "DEBUG", "logFormat": "text"}, ("DEBUG", "text"))]
)
def test_log_values_become_the_operators_flags(chart, monkeypatch, values, expected):
    args = operator_args(container(render(chart, values))["args"], monkeypatch)
    assert (args.log_level, args.log_format) == expected


@pytest.mark.parametrize("values", [{"logLevel": "verbose"}, {"logFormat": "logfmt"}])
def test_schema_refuses_other_log_values(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
