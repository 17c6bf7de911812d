"""Shared fixtures (helpers that tests call live in ``tests/helpers.py``), and the ``run`` mark.

A test that trains a run end to end (``Trainer.fit``, the driver, ``selfsup pretrain`` or ``demo``), in
its body or in a helper of its module that it calls, is marked ``run`` at collection: ``pytest tests/unit
-m "not run"`` is the unit tests proper, none of which trains.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from tests.helpers import write_tiny_shards

TRAINS = re.compile(
    r"(?<![\w.])fit\(|\.fit\(\)|pretrain\w*\(|(?<![\w.])train\(|train_here\("
    r"|main\(\[\s*\"(pretrain|demo)\"|main\(argv"
)
REFUSED = re.compile(r"\) == 2\b|pytest\.raises")  # a run refused before it starts trains nothing


def _trains(function, module, depth: int = 2) -> bool:
    """Whether ``function`` trains a run, itself or through a function of ``module`` it calls."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(TRAINS.search(line) and not REFUSED.search(line) for line in source.splitlines()[1:]):
        return True
    called = set(re.findall(r"\b(\w+)\(", source)) - {function.__name__}
    return depth > 0 and any(
        inspect.isfunction(helper := getattr(module, name, None))
        and helper.__module__ == module.__name__
        and _trains(helper, module, depth - 1)
        for name in called
    )


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and _trains(function, item.module):
            item.add_marker(pytest.mark.run)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty ``SELFSUP_CACHE`` (decoded splits, baseline scores, mirrored runs)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    return write_tiny_shards(tmp_path / "shards", [30, 50, 10, 40, 25, 35, 60])


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """A class folder of 12 ImageNet-like JPEGs of several sizes (``selfsup.data.synthetic``)."""
    from selfsup.data.synthetic import write_imagenet_like

    root = tmp_path_factory.mktemp("jpegs")
    write_imagenet_like(root, 12, classes=3, seed=0)
    return root


@pytest.fixture(scope="module")
def jpeg_shards(jpeg_folder, tmp_path_factory):
    """``jpeg_folder`` as shards of 5 samples, the JPEG bytes kept."""
    from selfsup.data.shards import write_shards
    from selfsup.data.sources import image_folder_samples

    out = tmp_path_factory.mktemp("shards")
    samples, n, classes = image_folder_samples(jpeg_folder)
    write_shards(samples, out, classes=classes, total=n, samples_per_shard=5)
    return out
