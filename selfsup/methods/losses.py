"""Losses as pure functions of embeddings, computed in fp32 (float64 inputs stay float64); each runs in the
profiler region "loss" (the training step's breakdown)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from selfsup.core.distributed import gather_no_grad, gather_with_grad, rank, sum_with_grad, world_size


def loss_region(fn):
    """``fn`` in the profiler region "loss", except while torch.compile traces it: dynamo cannot enter
    ``record_function``, and each loss would break the compiled step's graph in two."""

    @functools.wraps(fn)
    def in_region(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with record_function("loss"):
            return fn(*args, **kwargs)

    return in_region


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged if it is float64: at least single precision, never less than given."""
    return x if x.dtype == torch.float64 else x.float()


@loss_region
def nt_xent(zs: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss over V >= 2 views, with negatives from every rank.

    zs: [(B, D)] * V projections of the views on this rank. Each of the V·B local anchors has the other
    V − 1 views of its sample as positives and the embeddings of the other samples of every rank as
    negatives: ``−log(Σ_pos exp(s/τ) / Σ_{all but itself} exp(s/τ))`` on cosine similarities s, the
    multi-crop form of solo-learn's ``simclr_loss_func``; with two views, the paper's NT-Xent. Returns
    the mean loss, computed in fp32 (also under autocast).
    """
    with torch.autocast(zs[0].device.type, enabled=False):
        zs = [F.normalize(fp32(z), dim=1) for z in zs]
        b, w = zs[0].shape[0], world_size()
        local = torch.cat(zs, 0)  # (V·B, D), view after view
        everyone = torch.cat([gather_with_grad(z) for z in zs], 0)  # (V·W·B, D): every rank's view 1, then view 2...
        logits = local @ everyone.T / temperature  # (V·B, V·W·B)
        row = torch.arange(len(local), device=local.device)
        row_sample = rank() * b + row % b  # the global sample id of each anchor
        col_sample = torch.arange(len(everyone), device=local.device) % (w * b)
        self_idx = (row // b) * (w * b) + row_sample  # each anchor's own column
        # masked_fill takes the scalar as a kernel argument; an indexed assignment would copy it from the host
        self_mask = F.one_hot(self_idx, logits.shape[1]).bool()
        positive = (row_sample.unsqueeze(1) == col_sample.unsqueeze(0)) & ~self_mask
        everything = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1)
        positives = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1)
        return (everything - positives).mean()


@loss_region
def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v2's InfoNCE: each query against its key and a queue of negatives.

    q, k: (B, D) queries and their positive keys; queue: (K, D) L2-normalised negative keys. Logits are
    ``[q·k, q·queue] / temperature`` on L2-normalised q, k with the positive at index 0. Returns the
    mean loss, computed in fp32 (also under autocast).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(fp32(q), dim=1)
        k = F.normalize(fp32(k), dim=1)
        positive = (q * k).sum(1, keepdim=True)  # (B, 1)
        negative = q @ fp32(queue).T  # (B, K)
        logits = torch.cat([positive, negative], 1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


@loss_region
def info_nce_cross_rank(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss: queries against the keys of every rank, scaled by 2·temperature.

    q: (B, D) queries on this rank; k: (B, D) keys on this rank, without gradient. The candidates of
    each query are the W·B keys of all ranks; its positive is the key of the same sample. Returns
    ``2τ · mean cross-entropy`` on L2-normalised vectors, computed in fp32 (also under autocast).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(fp32(q), dim=1)
        keys = F.normalize(gather_no_grad(fp32(k)), dim=1)  # (W·B, D)
        logits = q @ keys.T / temperature  # (B, W·B)
        labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
        return 2 * temperature * F.cross_entropy(logits, labels)


@loss_region
def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss ``‖p̂ − ẑ‖² = 2 − 2·cos(p, z)``, mean over the batch; p, z: (B, D), fp32."""
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(fp32(p), fp32(z), dim=1)).mean()


@loss_region
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = −cos(p, z)``, mean over the batch; p, z: (B, D), fp32. Stop-gradient is the caller's."""
    with torch.autocast(p.device.type, enabled=False):
        return -F.cosine_similarity(fp32(p), fp32(z), dim=1).mean()


@loss_region
def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float
) -> dict[str, torch.Tensor]:
    """VICReg's loss (Bardes et al. 2022, as the official ``main_vicreg.py``): ``sim_coeff`` x the
    invariance (MSE of this rank's pairs) + ``std_coeff`` x the variance hinge + ``cov_coeff`` x the
    off-diagonal covariance, the last two over the embeddings of every rank (gathered with gradient).

    z1, z2: (B, D) expander outputs of the two views. Returns {"loss" (with gradient), "invariance",
    "variance", "covariance" (detached)}, computed in fp32 (also under autocast).
    """
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = fp32(z1), fp32(z2)
        invariance = F.mse_loss(z1, z2)
        everyone = [gather_with_grad(z) for z in (z1, z2)]  # (W·B, D) each
        std1, std2 = (F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() for z in everyone)
        cov1, cov2 = (_off_diagonal_sq(_covariance(z)) / z.shape[1] for z in everyone)
        variance, covariance = (std1 + std2) / 2, cov1 + cov2
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return {
        "loss": loss,
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }


@loss_region
def barlow_twins_loss(n1: torch.Tensor, n2: torch.Tensor, lambd: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Barlow Twins' loss (Zbontar et al. 2021, Algorithm 1): ``scale·(Σ_i (1 − C_ii)² + lambd·Σ_{i≠j} C_ij²)``.

    n1, n2: (B, D) projections of the two views, each standardised over the global batch (the
    caller's BatchNorm). C (D, D) is their cross-correlation over the global batch: this rank's
    ``n1ᵀn2`` summed over ranks (with gradient) over the global batch size. Returns {"loss",
    "on_diagonal", "off_diagonal" (detached, unscaled)}, computed in fp32 (also under autocast).
    """
    with torch.autocast(n1.device.type, enabled=False):
        n1, n2 = fp32(n1), fp32(n2)
        c = sum_with_grad(n1.T @ n2 / (n1.shape[0] * world_size()))
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        off_diagonal = _off_diagonal_sq(c)
        loss = scale * (on_diagonal + lambd * off_diagonal)
    return {"loss": loss, "on_diagonal": on_diagonal.detach(), "off_diagonal": off_diagonal.detach()}


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """The (D, D) covariance of the rows of ``z`` (N, D), unbiased, as the official VICReg computes it
    (``torch.cov`` reads a device value on the host: a stall each step on a GPU, a graph break compiled)."""
    centred = z - z.mean(dim=0)
    return centred.T @ centred / (z.shape[0] - 1)


def _off_diagonal_sq(m: torch.Tensor) -> torch.Tensor:
    """The sum of the squares of the off-diagonal entries of a square (D, D) matrix."""
    return m.pow(2).sum() - torch.diagonal(m).pow(2).sum()


@loss_region
def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_global: int,
    teacher_temp: float,
    student_temp: float,
) -> torch.Tensor:
    """DINO's loss (Caron et al. 2021, the official ``DINOLoss``): the cross-entropy between the
    teacher's centred, sharpened softmax of each global view and the student's softmax of every other view.

    student: (V·B, K) logits of all V views, view after view, the ``n_global`` = G global views first;
    teacher: (G·B, K) the teacher's logits of the global views; center: (1, K). Pairs of a view with
    itself are left out: the mean over the G·V − G other pairs of each pair's batch mean, in fp32.
    """
    with torch.autocast(student.device.type, enabled=False):
        b = teacher.shape[0] // n_global
        t = F.softmax((fp32(teacher) - fp32(center)) / teacher_temp, dim=-1).unflatten(0, (n_global, b))
        s = F.log_softmax(fp32(student) / student_temp, dim=-1).unflatten(0, (-1, b))
        pairs = -torch.einsum("tbk,sbk->ts", t, s) / b  # (G, V): each pair's batch mean
        same = torch.eye(n_global, s.shape[0], dtype=torch.bool, device=pairs.device)
        return pairs.masked_fill(same, 0.0).sum() / (pairs.numel() - n_global)
