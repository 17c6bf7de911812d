"""Linear probe on frozen features, with a learning-rate x weight-decay grid trained in one pass.

DINOv2-style: features are standardised with statistics of the training part (BatchNorm1d with
``affine=False`` at evaluation, folded in), then every grid member is one slice of a single
(D, G*C) weight matrix, so one GEMM per batch trains all G members at once. The features stay on the
host and reach the device (a GPU when there is one) a batch at a time: V views x N images x D of
ImageNet would not fit a GPU (4 x 1.28M x 2048 floats: 42 GB). Each member uses
SGD with Nesterov momentum 0.9 and a cosine schedule on the mean cross-entropy; weight decay
applies to weights, not biases. Members are scored on a held-out ``val_fraction`` of the train
set; the best (lowest lr, then lowest decay on ties) is refit on the full train set and scored
on the test set.

``linear_probe_paper`` is the papers' protocol instead (SimCLR / MoCo / DINO): one linear layer
on the frozen backbone, trained on random-resized crops with flips for 100 epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from selfsup.core.progress import progress
from selfsup.eval.knn import check_labels, check_split_pair

_MOMENTUM = 0.9


@dataclass
class LinearProbeResult:
    """Test ``top1`` / ``top5`` fractions, test ``probabilities`` (M, C) and ``predictions`` (M,),
    the chosen ``lr`` / ``weight_decay`` with their held-out ``val_top1``, and ``grid``:
    "lr=…,wd=…" -> held-out top-1 of every member."""

    top1: float
    top5: float
    probabilities: np.ndarray
    predictions: np.ndarray
    lr: float
    weight_decay: float
    val_top1: float
    grid: dict[str, float] = field(default_factory=dict)


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    epochs: int | None = None,
    batch_size: int = 512,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: bool = True,
    train_views: int = 1,
) -> LinearProbeResult:
    """Train linear classifiers on ``train_x`` (V·N, D) / ``train_y`` (V·N,), score on ``test_x`` (M, D).

    The grid ``lrs`` x ``weight_decays`` is trained in parallel on all but a random ``val_fraction``
    of the train images and chosen on those; ``refit`` retrains the winner on all train rows.
    ``train_views`` = V: the train rows are V blocks of the same N images, block 0 un-augmented and
    the others augmented views (``selfsup.tasks.vision.probe_features``); every block is
    trained on, the held-out images are scored on block 0 only, and no image is on both sides.
    ``epochs`` (passes over the train rows) defaults to 20 / V: the same number of steps at any V.
    """
    train_x, train_y, test_x, test_y = check_split_pair(
        train_x, train_y, test_x, test_y, ("train features", "test features")
    )
    grid, epochs, images, n_val = _plan(
        train_y, test_y, num_classes, lrs, weight_decays, epochs, batch_size, val_fraction, train_views
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train_x.astype(np.float32, copy=False))  # on the host, read a batch at a time
    y = torch.from_numpy(train_y)
    perm = torch.randperm(images, generator=gen)
    val_rows = perm[:n_val]
    fit_rows = (perm[n_val:] + images * torch.arange(train_views).unsqueeze(1)).reshape(-1)

    model = _fit(x, y, fit_rows, num_classes, grid, epochs, batch_size, gen, device)
    if n_val:
        val_pred = _predict(model, x[val_rows], lambda logits: logits.argmax(-1))  # (n_val, G)
        val_top1 = (val_pred == y[val_rows, None]).float().mean(0).numpy()
    else:
        val_top1 = np.full(len(grid), np.nan)
    chosen = int(np.argmax(np.nan_to_num(val_top1, nan=-1.0)))  # first best: lowest lr, then decay
    lr, wd = grid[chosen]
    member = chosen
    if refit:
        model, member = _fit(x, y, torch.arange(len(x)), num_classes, [(lr, wd)], epochs, batch_size, gen, device), 0

    logits = _predict(model, torch.from_numpy(test_x.astype(np.float32, copy=False)), lambda out: out[:, member])
    return _scored(
        logits,
        test_y,
        num_classes,
        lr,
        wd,
        float(val_top1[chosen]),
        {f"lr={g_lr:g},wd={g_wd:g}": float(v) for (g_lr, g_wd), v in zip(grid, val_top1)},
    )


def _plan(
    train_y: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int | None,
    batch_size: int,
    val_fraction: float,
    train_views: int,
) -> tuple[list[tuple[float, float]], int, int, int]:
    """Check :func:`linear_probe`'s arguments against the labels (V·N,) / (M,): (the grid of
    (lr, weight decay), the epochs, the N images per view block, the n_val held-out images)."""
    if max(train_y.max(), test_y.max()) >= num_classes:
        raise ValueError(f"labels go up to {max(train_y.max(), test_y.max())} but num_classes={num_classes}")
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not grid or min(lr for lr, _ in grid) <= 0 or min(wd for _, wd in grid) < 0:
        raise ValueError("lrs must be positive and weight_decays non-negative, neither empty")
    if train_views < 1 or len(train_y) % train_views:
        raise ValueError(f"{len(train_y)} train rows do not split into train_views={train_views} equal blocks")
    epochs = max(1, round(20 / train_views)) if epochs is None else epochs
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    images = len(train_y) // train_views
    if (train_y.reshape(train_views, images) != train_y[:images]).any():
        raise ValueError(
            f"the {train_views} blocks of train rows must hold the same images in the same order (their labels differ)"
        )
    n_val = round(images * val_fraction)
    if len(grid) > 1 and not 1 <= n_val < images:
        raise ValueError(f"val_fraction={val_fraction} leaves no held-out images (or no training images) of {images}")
    return grid, epochs, images, n_val


def _scored(
    logits: torch.Tensor,
    test_y: np.ndarray,
    num_classes: int,
    lr: float,
    weight_decay: float,
    val_top1: float,
    grid: dict[str, float] | None = None,
) -> LinearProbeResult:
    """The result of test ``logits`` (M, C) against ``test_y`` (M,): top-1/top-5 (ties go to the lower class)."""
    probabilities = torch.softmax(logits.double(), dim=-1).cpu().numpy()
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(5, num_classes)]
    return LinearProbeResult(
        top1=float((top[:, 0] == test_y).mean()),
        top5=float((top == test_y[:, None]).any(axis=1).mean()),
        probabilities=probabilities,
        predictions=top[:, 0].astype(np.int64),
        lr=lr,
        weight_decay=weight_decay,
        val_top1=val_top1,
        grid=grid or {},
    )


@dataclass
class _Model:
    mean: torch.Tensor  # (D,)
    inv_std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, G*C)
    bias: torch.Tensor  # (G*C,)
    members: int


CHUNK = 8192  # rows a device holds at a time outside training (statistics, scoring)


def _to(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """A host tensor on the probe's device: every copy there is one batch or one ``CHUNK`` of rows."""
    return t.to(device, non_blocking=True)


def _logits(model: _Model, x: torch.Tensor) -> torch.Tensor:
    """(B, D) raw features on the model's device -> (B, G, C) logits of every grid member."""
    z = (x - model.mean) * model.inv_std
    return (z @ model.weight + model.bias).view(len(x), model.members, -1)


def _predict(model: _Model, x: torch.Tensor, keep) -> torch.Tensor:
    """``keep(logits (B, G, C))`` of the host rows ``x`` (M, D), a ``CHUNK`` at a time, on the host."""
    return torch.cat(
        [keep(_logits(model, _to(model.weight.device, x[s : s + CHUNK]))).cpu() for s in range(0, len(x), CHUNK)]
    )


def _standardiser(x: torch.Tensor, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and 1 / (std + 1e-6) (D,) of the host rows ``x[rows]``, summed a ``CHUNK`` at a time
    in float64 on ``device``."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for s in range(0, len(rows), CHUNK):
        block = _to(device, x[rows[s : s + CHUNK]]).double()
        total += block.sum(0)
        squares += block.square().sum(0)
    mean = total / len(rows)
    std = (squares / len(rows) - mean.square()).clamp_(min=0).sqrt()
    return mean.float(), (1.0 / (std + 1e-6)).float()


def _fit(x, y, rows, c: int, grid, epochs: int, batch_size: int, gen: torch.Generator, device: torch.device) -> _Model:
    """SGD (Nesterov) on mean cross-entropy for all grid members at once, closed-form gradients, on the
    host rows ``x[rows]`` (D wide) and labels ``y[rows]``, a batch at a time on ``device``."""
    n, d = len(rows), x.shape[1]
    g = len(grid)
    mean, inv_std = _standardiser(x, rows, device)
    model = _Model(mean, inv_std, mean.new_zeros(d, g * c), mean.new_zeros(g * c), g)
    lr = torch.tensor([lr for lr, _ in grid], device=device).repeat_interleave(c)  # (G*C,)
    wd = torch.tensor([wd for _, wd in grid], device=device).repeat_interleave(c)
    vel_w, vel_b = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = rows[torch.randperm(n, generator=gen)]
        for s in range(0, n, batch_size):
            batch = order[s : s + batch_size]
            z = (_to(device, x[batch]) - model.mean) * model.inv_std  # (B, D), standardised
            logits = (z @ model.weight + model.bias).view(len(batch), g, c)
            grad = (logits - logits.amax(-1, keepdim=True)).exp_()  # softmax; torch's is slow for small C
            grad /= grad.sum(-1, keepdim=True)
            grad[torch.arange(len(batch)), :, _to(device, y[batch])] -= 1.0
            grad = grad.view(len(batch), g * c) / len(batch)  # d(mean CE) / d logits
            grad_w = z.T @ grad + wd * model.weight
            grad_b = grad.sum(0)
            scale = lr * (0.5 * (1.0 + math.cos(math.pi * step / total)))
            vel_w.mul_(_MOMENTUM).add_(grad_w)
            vel_b.mul_(_MOMENTUM).add_(grad_b)
            model.weight -= scale * (grad_w + _MOMENTUM * vel_w)
            model.bias -= scale * (grad_b + _MOMENTUM * vel_b)
            step += 1
    return model


def linear_probe_paper(
    encoder: nn.Module,
    train_images: torch.Tensor,
    train_y,
    test_images: torch.Tensor,
    test_y,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    crop_scale: tuple[float, float] | None = None,
    seed: int = 0,
) -> LinearProbeResult:
    """The paper protocol: BatchNorm (no affine) + one linear layer on the frozen ``encoder`` (eval
    mode), trained on uint8 ``train_images`` (N, C, H, W) through random-resized crops + horizontal
    flips (``BatchViews``), SGD momentum 0.9, ``lr`` scaled by ``batch_size`` / 256 with a cosine
    schedule per step, for ``epochs``; scored on un-augmented ``test_images`` (M, C, H, W).
    ``crop_scale`` defaults to ``paper_crop_scale(image_size)`` (tiny crops of a 28-px image leave a
    few pixels and cost the probe points that no paper's CIFAR protocol loses).
    ``val_top1`` is NaN and ``grid`` empty: nothing is tuned."""
    from selfsup.config import ViewRecipe
    from selfsup.tasks.vision import paper_crop_scale
    from selfsup.vision.augment import BatchViews

    crop_scale = crop_scale or paper_crop_scale(image_size)

    train_y = torch.from_numpy(check_labels(train_y, len(train_images), "train"))
    test_y = check_labels(test_y, len(test_images), "test")
    if len(train_images) == 0 or len(test_images) == 0:
        raise ValueError("the train or test split is empty")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    device = next(encoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # batch order; the crops draw on the encoder's device
    views = BatchViews(
        [ViewRecipe(crop_scale=crop_scale, flip_p=0.5)],
        image_size,
        list(mean),
        list(std),
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    encoder.eval()
    with torch.no_grad():
        dim = encoder(views.plain(test_images[:2].to(device))).shape[1]
    linear = nn.Linear(dim, num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear).to(device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=lr * batch_size / 256, momentum=_MOMENTUM, weight_decay=weight_decay
    )
    _train_head(
        head,
        optimizer,
        lambda rows: encoder(views(train_images[rows].to(device))[0]).float(),
        train_y,
        epochs,
        batch_size,
        gen,
    )
    head.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                head(encoder(views.plain(test_images[s : s + 1024].to(device))).float())
                for s in range(0, len(test_images), 1024)
            ]
        )
    return _scored(logits, test_y, num_classes, lr, weight_decay, float("nan"))


def _train_head(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    features,
    train_y: torch.Tensor,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    """Train ``head`` on the frozen ``features(rows)`` (B, D) of the (B,) train rows: cross-entropy
    against ``train_y`` (N,), ``epochs`` passes in ``gen``'s order, ``optimizer``'s lr on a cosine per step."""
    device = next(head.parameters()).device
    total = epochs * math.ceil(len(train_y) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total)))
    for _ in progress(range(epochs), desc="paper probe", unit="epoch", mininterval=1.0, leave=False):
        head.train()
        order = torch.randperm(len(train_y), generator=gen)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            with torch.no_grad():
                x = features(rows)
            loss = nn.functional.cross_entropy(head(x), train_y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
