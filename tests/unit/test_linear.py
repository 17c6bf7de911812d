"""Linear probe: accuracy on a Gaussian mixture, agreement with sklearn, the parallel grid."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from selfsup.eval import linear
from selfsup.eval.linear import linear_probe


def mixture(rng, n, centres, noise):
    y = rng.integers(0, len(centres), n)
    return (centres[y] + noise * rng.normal(size=(n, centres.shape[1]))).astype(np.float32), y


@pytest.fixture(scope="module")
def overlapping():
    """6 classes in 24-D whose optimal (nearest-centre) accuracy is about 0.85."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 24)) * 2.0 + 5.0  # offset and scale: standardisation must cope
    xtr, ytr = mixture(rng, 2400, centres, 3.4)
    xte, yte = mixture(rng, 1200, centres, 3.4)
    bayes = (((xte[:, None] - centres[None]) ** 2).sum(-1).argmin(1) == yte).mean()
    return xtr, ytr, xte, yte, bayes


def test_mixture_accuracy_matches_sklearn_and_probabilities_are_distributions(overlapping):
    xtr, ytr, xte, yte, bayes = overlapping
    r = linear_probe(xtr, ytr, xte, yte, 6, epochs=15, batch_size=256)
    sk = LogisticRegression(max_iter=1000).fit(xtr, ytr).score(xte, yte)
    assert 0.8 < bayes < 0.9
    assert bayes - 0.06 <= r.top1 <= bayes + 0.03
    assert abs(r.top1 - sk) <= 0.03
    assert r.top1 <= r.top5 and r.top5 > 0.98
    assert r.probabilities.shape == (1200, 6)
    np.testing.assert_allclose(r.probabilities.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(r.predictions, r.probabilities.argmax(1))
    assert r.top1 == pytest.approx((r.predictions == yte).mean())
    assert (r.lr, r.weight_decay) in [
        (lr, wd) for lr in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0) for wd in (0, 1e-4, 1e-3, 1e-2)
    ]
    assert len(r.grid) == 28 and r.val_top1 == max(r.grid.values()) and 0.7 < r.val_top1 <= 1.0


def test_separable_data_is_learned_exactly():
    rng = np.random.default_rng(1)
    centres = np.eye(3, 8) * 10
    xtr, ytr = mixture(rng, 300, centres, 0.5)
    xte, yte = mixture(rng, 100, centres, 0.5)
    r = linear_probe(xtr, ytr, xte, yte, 3, lrs=(0.1,), weight_decays=(0.0,), epochs=5, refit=False)
    assert r.top1 == 1.0 and r.top5 == 1.0 and r.probabilities.shape == (100, 3)


def test_grid_members_train_exactly_as_if_alone():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(500, 10)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 4, 500))
    grid = [(0.01, 0.0), (0.3, 1e-2), (1.0, 1e-3)]
    rows, cpu = torch.arange(500), torch.device("cpu")
    together = linear._fit(x, y, rows, 4, grid, 3, 64, torch.Generator().manual_seed(0), cpu)
    for g, member in enumerate(grid):
        alone = linear._fit(x, y, rows, 4, [member], 3, 64, torch.Generator().manual_seed(0), cpu)
        torch.testing.assert_close(together.weight[:, 4 * g : 4 * g + 4], alone.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.bias[4 * g : 4 * g + 4], alone.bias, rtol=1e-4, atol=1e-5)
    # different hyper-parameters really produce different classifiers
    assert not torch.allclose(together.weight[:, :4], together.weight[:, 4:8], atol=1e-3)


def test_validation_errors(overlapping):
    xtr, ytr, xte, yte, _ = overlapping
    with pytest.raises(ValueError, match="the train split is empty"):
        linear_probe(xtr[:0], ytr[:0], xte, yte, 6)
    with pytest.raises(ValueError, match="2 rows of the test features contain NaN or inf"):
        linear_probe(xtr, ytr, np.where(np.arange(1200)[:, None] < 2, np.nan, xte), yte, 6)
    with pytest.raises(ValueError, match="num_classes=5"):
        linear_probe(xtr, ytr, xte, yte, 5)
    with pytest.raises(ValueError, match="val_fraction=0.0 leaves no held-out images"):
        linear_probe(xtr, ytr, xte, yte, 6, val_fraction=0.0)
    with pytest.raises(ValueError, match="dimension 24 but test features have 3"):
        linear_probe(xtr, ytr, xte[:, :3], yte, 6)


def test_augmented_views_are_trained_on_but_held_out_by_image():
    """Random labels on 512-D noise: a linear layer memorises its training rows, so a held-out image
    whose second view sat in the training rows would score ~100%; held out by image it scores chance."""
    rng = np.random.default_rng(4)
    images, views = 300, 2
    x0 = rng.normal(size=(images, 512)).astype(np.float32)
    y0 = rng.integers(0, 4, images)
    x = np.concatenate([x0, x0 + 0.01 * rng.normal(size=x0.shape).astype(np.float32)])  # view 2 ~ view 1
    y = np.tile(y0, views)
    r = linear_probe(
        x, y, x0[:50], y0[:50], 4, lrs=(1.0,), weight_decays=(0.0,), epochs=30, val_fraction=0.2, train_views=views
    )
    assert r.val_top1 < 0.5  # chance is 0.25; a leak would give ~1.0
    assert r.top1 > 0.95  # the refit on every row memorises the train images, test rows included here
    with pytest.raises(ValueError, match="do not split into train_views=2"):
        linear_probe(x[:-1], y[:-1], x0, y0, 4, train_views=2)
    with pytest.raises(ValueError, match="same images in the same order"):
        linear_probe(x, np.concatenate([y0, (y0 + 1) % 4]), x0, y0, 4, train_views=2)


def test_paper_probe_learns_through_augmented_crops_and_leaves_the_backbone_frozen():
    from torch import nn

    from selfsup.eval.linear import linear_probe_paper
    from tests.helpers import make_images

    x, y = make_images(400, seed=3)  # a bright square in one quadrant (0 1 / 2 3) ...
    images, y = torch.from_numpy(x)[:, None], y // 2  # ... as top / bottom: classes that survive a horizontal flip
    encoder = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 8 quadrant features
    before = [p.detach().clone() for p in encoder.parameters()]
    r = linear_probe_paper(
        encoder,
        images[:200],
        y[:200],
        images[300:],
        y[300:],
        2,
        image_size=28,
        mean=[0.3],
        std=[0.3],
        epochs=2,
        batch_size=32,
        lr=0.3,
        crop_scale=(0.6, 1.0),
    )
    assert r.top1 > 0.9 and r.top1 == pytest.approx((r.predictions == y[300:]).mean())
    assert r.probabilities.shape == (100, 2) and np.isnan(r.val_top1)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, encoder.parameters()))


def test_the_features_reach_the_device_a_batch_or_a_chunk_at_a_time(monkeypatch):
    """The V x N x D train rows stay on the host (ImageNet's would not fit a GPU): every copy to the
    probe's device holds at most one batch or one CHUNK of rows, and chunking changes no result."""
    rng = np.random.default_rng(5)
    centres = np.eye(3, 16) * 3
    xtr, ytr = mixture(rng, 600, centres, 1.0)
    xte, yte = mixture(rng, 150, centres, 1.0)
    whole = linear_probe(xtr, ytr, xte, yte, 3, lrs=(0.1, 1.0), weight_decays=(0.0,), epochs=2, batch_size=64)
    moved, to = [], linear._to
    monkeypatch.setattr(linear, "CHUNK", 100)
    monkeypatch.setattr(linear, "_to", lambda device, t: moved.append(len(t)) or to(device, t))
    chunked = linear_probe(xtr, ytr, xte, yte, 3, lrs=(0.1, 1.0), weight_decays=(0.0,), epochs=2, batch_size=64)
    assert max(moved) == 100 and moved.count(64) > 10
    # each fit: its rows once for the statistics, then 2 epochs of features and labels; 540 rows, then
    # the refit's 600; then the 60 held-out rows and the 150 test rows
    assert sum(moved) == 540 * (1 + 2 * 2) + 600 * (1 + 2 * 2) + 60 + 150
    assert chunked.top1 == whole.top1 and chunked.lr == whole.lr
    np.testing.assert_allclose(chunked.probabilities, whole.probabilities, atol=1e-5)
