"""Shared fixtures (helpers that tests call live in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_tiny_shards


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty ``SELFSUP_CACHE`` (decoded splits, baseline scores, mirrored runs)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    return write_tiny_shards(tmp_path / "shards", [30, 50, 10, 40, 25, 35, 60])
