"""``train.compile`` with inductor, torch's default backend (``tests/unit/test_compile.py`` uses
aot_eager, which builds no kernels): MoCo v2, whose Shuffle-BN permutation once made inductor fail
("Not all inputs to pattern found in match.kwargs", its randperm-index pattern, torch 2.11), trains
6 steps, one rejected, as eager does. About a minute on 2 cores: inductor builds C++ for each graph.

Tolerance: inductor fuses the element-wise work and may sum in another order, a few float32 ULPs an
op; after 6 SGD steps that stays below 1e-4 relative, where a lost queue write or BatchNorm update is
1e-3 or more. ``fallback_random``: inductor's own generator would draw another Shuffle-BN permutation
than eager's."""

from __future__ import annotations

import pytest
import torch._inductor.config

from tests.unit.test_bad_steps import HEADS, small_backbone, tiny_config
from tests.unit.test_compile import assert_compiled_matches_eager

pytestmark = pytest.mark.integration


def test_moco_v2_compiles_with_inductor_and_trains_as_eager(tmp_path, monkeypatch):
    monkeypatch.setattr("selfsup.tasks.vision.build_backbone", small_backbone)
    cfg = tiny_config(tmp_path, "method.name=moco_v2", *HEADS["moco_v2"], "optim.max_bad_steps=5")
    # the config's own patch, not monkeypatch: monkeypatch's undo of a config attribute hides it from torch
    # for the rest of the process ("fallback_random does not exist" in every later compile)
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_matches_eager(cfg, "moco_v2", monkeypatch, backend="inductor", rtol=1e-4, atol=1e-5)
