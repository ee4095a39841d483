"""Fixtures of the operator's end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import REFERENCE_CLAIM
from kleinstyle.devcluster.references import write_references


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An embedded cluster's root folder with the bd9 reference images on the reference claim."""
    write_references(tmp_path / "volumes" / REFERENCE_CLAIM / "bd9")
    return tmp_path
