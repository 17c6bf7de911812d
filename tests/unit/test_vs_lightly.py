"""benchmarks/vs_lightly.py on a tiny backbone: lightly's loops, selfsup's Trainer.step and the ceiling each
train the same backbone from the same weights, every step is counted, and the report adds up (no timings
are asserted), on random images. lightly is the ``reference`` extra, which ``make test`` installs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import vs_lightly as bench

TINY = ["--width", "2", "--batch", "8", "--images", "16", "--threads", "1", "--workers", "0", "--warmup", "0"]


@pytest.fixture(autouse=True)
def _images_and_threads(monkeypatch):
    """Random 28x28 images in place of Fashion-MNIST's (CI may not have it); torch's threads put back."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(bench, "fmnist_images", lambda n: rng.integers(0, 256, (n, 28, 28), np.uint8))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_each_loop_trains_the_same_backbone_from_the_same_weights(tmp_path):
    args = bench.parse_args(TINY)
    images = bench.fmnist_images(16)
    shards = bench.write_fmnist_shards(images, tmp_path / "shards")
    cfg = bench.config("byol", args, shards, str(tmp_path / "runs"))
    (lightly_encoder, dim), (selfsup_encoder, _) = bench.backbone(cfg), bench.backbone(cfg)
    start = {k: v.clone() for k, v in lightly_encoder.state_dict().items()}
    lightly = bench.LightlyLoop("byol", cfg, lightly_encoder, dim, images, total_steps=2)
    ours = bench.SelfsupLoop(cfg, selfsup_encoder)
    objective = ours.trainer.objective
    assert dim == 8 * 2  # width 2: the last stage has 8x its channels
    for name, value in objective.encoder.state_dict().items():  # the Trainer's backbone took these weights
        assert torch.equal(value, start[name]), name
    for name, value in objective.target_encoder.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert lightly.step() == 8 and ours.step() == 8
    assert ours.trainer.steps_done == 1 and lightly.steps == 1
    conv = "layer1.0.conv1.weight"  # both optimisers moved the backbone itself
    assert not torch.equal(lightly_encoder.state_dict()[conv], start[conv])
    assert not torch.equal(objective.encoder.state_dict()[conv], start[conv])
    moved = lightly_encoder.state_dict()[conv]  # lightly's BYOL target: 0.99 of the start, 0.01 of the step's weights
    assert torch.allclose(lightly.target_encoder.state_dict()[conv], 0.99 * start[conv] + 0.01 * moved, atol=1e-6)


def test_report_counts_every_step_and_adds_up(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = bench.main([*TINY, "--blocks", "2", "--steps", "1", "--profile-steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = ["lightly simclr", "selfsup simclr", "lightly byol", "selfsup byol", "ceiling", "ceiling + target"]
    assert sorted(result["images"]) == sorted(names)
    assert all(result["images"][n] == 2 * 1 * 8 for n in names)  # 2 blocks of 1 step of 8 images
    for n in names:
        blocks = result["block_img_per_s"][n]
        assert len(blocks) == 2 and result["img_per_s"][n] == pytest.approx(sum(blocks) / 2)  # median of two
        assert set(result["breakdown_s_per_step"][n]) == {*bench.REGIONS, "step"}
    for method in ("simclr", "byol"):
        row = result["methods"][method]
        assert row["ratio"] == pytest.approx(row["selfsup"] / row["lightly"])
        assert row["selfsup_of_ceiling"] == pytest.approx(row["selfsup"] / result["img_per_s"]["ceiling"])
    target = result["methods"]["byol"]["selfsup_of_ceiling_with_target"]
    assert target == pytest.approx(result["img_per_s"]["selfsup byol"] / result["img_per_s"]["ceiling + target"])
    assert "ceiling_with_target" not in result["methods"]["simclr"]
    ours = result["breakdown_s_per_step"]["selfsup byol"]
    assert ours["views"] > 0 and ours["loss"] > 0 and ours["on_after_step"] > 0  # the Trainer's regions were seen
    assert result["breakdown_s_per_step"]["ceiling"]["loss"] == 0  # the ceiling has no loss region
    printed = capsys.readouterr().out
    assert "simclr" in printed and "step breakdown" in printed and str(out) in printed
