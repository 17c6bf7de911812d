"""The CUDA path: GPU augmentation, bf16 + channels_last + fused-optimiser steps with no host sync,
the torch kNN engine on the GPU, wav2vec 2.0 on the GPU, and the training loop end to end.

Every test here skips itself where CUDA is absent (CI has no GPU); run them on a GPU machine with
``pytest -m cuda``.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from selfsup.config import ViewRecipe, parse_config
from selfsup.core.objective import Progress
from selfsup.train.optim import build_optimizer
from selfsup.vision.augment import BatchViews
from tests.helpers import fit
from tests.unit.test_augment import SIZE, N, striped_ramps, view_stats

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VISION_METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "vicreg", "barlow_twins", "dino"]


def test_gpu_augmentation_draws_the_cpu_distribution():
    """The same recipe on CPU and GPU tensors gives the same view statistics (each within a few
    standard errors of the other), drawing on the device of the images."""
    images = striped_ramps(N)
    recipe = ViewRecipe(crop_scale=(0.2, 1.0), flip_p=0.5, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    cpu = view_stats(BatchViews([recipe], SIZE, [0.0], [1.0], torch.Generator().manual_seed(0))(images)[0])
    views = BatchViews([recipe], SIZE, [0.0], [1.0], torch.Generator(device="cuda").manual_seed(0))(images.cuda())[0]
    assert views.device.type == "cuda"
    gpu = view_stats(views.float().cpu())
    assert gpu["mean"] == pytest.approx(cpu["mean"], abs=0.015)
    assert gpu["spread_of_means"] == pytest.approx(cpu["spread_of_means"], rel=0.15)
    assert gpu["std"] == pytest.approx(cpu["std"], abs=0.015)
    assert gpu["row_roughness"] == pytest.approx(cpu["row_roughness"], rel=0.1)
    assert gpu["flipped"] == pytest.approx(cpu["flipped"], abs=0.09)


def _method_config(method: str):
    tree = {
        "name": "cuda",
        "data": {
            "train": "unused",
            "image_size": 32,
            "channels": 3,
            "batch_size": 64,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
        "model": {"width": 16, "small_stem": True},
        "augment": {"preset": "simclr"},
        "method": {"name": method},
        "optim": {"name": "sgd" if method in ("moco_v2", "simsiam") else "lars"},
    }
    if method == "moco_v2":
        tree["method"]["queue_size"] = 256
    if method == "dino":  # multi-crop: two global views of 32 px, two local views of 16 px
        tree["augment"] = {"views": [{}, {}, {"size": 16, "copies": 2}]}
    return parse_config(tree, [])


@contextlib.contextmanager
def no_host_sync():
    """Fails listing every synchronising call (file:line) made inside the block."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [
        f"{w.filename}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)
    ]
    assert not syncs, f"{len(syncs)} host syncs: {syncs}"


def _cuda_step_parts(method: str):
    from selfsup.tasks.vision import VisionTask

    cfg = _method_config(method)
    torch.manual_seed(0)
    model = VisionTask().build_objective(cfg).cuda().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.param_groups(), cfg.optim, 0.05)
    views = BatchViews(
        cfg.view_recipes(), 32, cfg.data.mean, cfg.data.std, torch.Generator(device="cuda").manual_seed(0)
    )
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return model, optimizer, views, images.cuda()


def _step(model, optimizer, views, images, step: int) -> torch.Tensor:
    progress = Progress(step, 10, 5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model([v.contiguous(memory_format=torch.channels_last) for v in views(images)], progress)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    model.on_gradients(progress)
    optimizer.step()
    model.on_after_step(progress)
    return out["loss"].detach()


@pytest.mark.parametrize("method", VISION_METHODS)
def test_every_method_steps_on_cuda_in_bf16_channels_last_with_a_fused_optimiser(method):
    model, optimizer, views, images = _cuda_step_parts(method)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    losses = [_step(model, optimizer, views, images, i) for i in range(3)]
    assert all(torch.isfinite(loss).item() for loss in losses), losses
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, (p for p in model.parameters() if p.requires_grad))]
    assert sum(moved) >= 0.9 * len(moved), f"only {sum(moved)} of {len(moved)} parameter tensors changed"


@pytest.mark.parametrize("method", VISION_METHODS)
def test_a_training_step_makes_no_host_sync(method):
    """Augmentation, forward, backward, optimiser step and momentum update never wait for the GPU
    (torch warns on every synchronising call under sync-debug mode "warn")."""
    model, optimizer, views, images = _cuda_step_parts(method)
    _step(model, optimizer, views, images, 0)  # lazy state (momentum buffers, cuDNN plans) outside the check
    with no_host_sync():
        _step(model, optimizer, views, images, 1)


def test_torch_knn_on_cuda_matches_the_numpy_reference_exactly():
    from selfsup.eval.knn import weighted_knn

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 32)).astype(np.float32)
    bank[1000:1010] = bank[5]  # exact ties, broken by bank index
    queries = rng.normal(size=(700, 32)).astype(np.float32)
    queries[:3] = bank[5]
    yb, yq = rng.integers(0, 7, 3000), rng.integers(0, 7, 700)
    gpu = weighted_knn(bank, yb, queries, yq, ((20, 0.07), (200, 0.1)), backend="torch", chunk_size=256)
    ref = weighted_knn(bank, yb, queries, yq, ((20, 0.07), (200, 0.1)), backend="numpy", chunk_size=256)
    np.testing.assert_array_equal(gpu.neighbours, ref.neighbours)
    np.testing.assert_array_equal(gpu.similarities, ref.similarities)
    for key in ref.top1:
        assert abs(gpu.top1[key] - ref.top1[key]) <= 1e-9 and abs(gpu.top5[key] - ref.top5[key]) <= 1e-9


def test_wav2vec2_steps_on_cuda_in_bf16_without_host_sync():
    from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
    from selfsup.config import Wav2Vec2Config
    from tests.unit.test_wav2vec2 import _batch

    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(Wav2Vec2Config.tiny()).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    waves, lengths = (t.cuda() for t in _batch())

    def step(i: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model((waves, lengths), Progress(i, 10))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        model.on_after_step(Progress(i, 10))
        return out["loss"].detach()

    first = step(0)
    with no_host_sync():
        second = step(1)
    assert torch.isfinite(first).item() and torch.isfinite(second).item()


def _tiny_byol_run(tmp_path):
    """BYOL on 256 tiny images, batch 32, 2 epochs (16 steps), on the GPU, logging every 4 steps."""
    from tests.helpers import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", [128, 128])
    return parse_config(
        {
            "name": "gpu",
            "run_root": str(tmp_path / "runs"),
            "data": {"train": str(shards), "batch_size": 32, "loader_workers": 1, "shuffle_buffer": 0},
            "model": {"width": 8},
            "method": {"name": "byol", "proj_hidden_dim": 32, "pred_hidden_dim": 32, "proj_dim": 16},
            "optim": {"warmup_epochs": 0, "epochs": 2},
            "scaling": {"use_gpu": True},
            "train": {"log_every_steps": 4, "checkpoint_every_steps": 1000, "channels_last": True},
        },
        [],
    )


def test_the_training_loop_runs_on_cuda_and_its_checkpoint_loads_on_cpu(tmp_path):
    from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
    from selfsup.tasks.vision import VisionTask

    cfg = _tiny_byol_run(tmp_path)
    summary = fit(cfg)
    assert summary["steps"] == summary["total_steps"] == 16 and summary["bad_steps"] == 0
    saved, state, _ = load_checkpoint(latest_checkpoint(cfg.run_dir))
    model = VisionTask().build_objective(saved)
    model.load_state_dict(state, strict=True)  # the GPU run's weights load into a CPU model
    with torch.no_grad():
        features = model.encoder(torch.rand(4, 1, 28, 28))
    assert features.shape == (4, 64) and torch.isfinite(features).all()


def test_the_training_loop_makes_no_host_sync_between_logging_steps(tmp_path, monkeypatch):
    """Reading the batch, augmenting, the step, the NaN check (counted on the device) and the
    momentum update: no sync in any step that neither logs nor checkpoints."""
    from selfsup.methods.byol import BYOL

    cfg = _tiny_byol_run(tmp_path)
    marks: list[tuple[int, int]] = []  # (step, warnings caught when its forward began)
    forward = BYOL.forward

    def marked(self, views, progress):
        marks.append((progress.step, len(caught)))
        return forward(self, views, progress)

    monkeypatch.setattr(BYOL, "forward", marked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    is_sync = [("synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)) for w in caught]
    where = [f"{w.filename}:{w.lineno}" for w, s in zip(caught, is_sync) if s]
    assert [s for s, _ in marks] == list(range(16))
    quiet = [s for s in range(1, 15) if (s + 1) % 4]  # steps 1, 2, 4, 5, 6, 8, ...: no logging after them
    syncs = {s: sum(is_sync[marks[s][1] : marks[s + 1][1]]) for s in quiet}
    assert not any(syncs.values()), f"host syncs per quiet step {syncs}; all syncs at {sorted(set(where))}"
