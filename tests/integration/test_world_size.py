"""W ranks equal one: 2 gloo ranks with B/2 samples each against 1 process with the same B samples.

Same weights, same deterministic views (no augmentation), float64 on CPU. Where the paper's BatchNorm
is in force (global BN for SimCLR, BYOL and SimSiam, SyncBN for MoCo v3, VICReg, Barlow Twins and MoCo
v2's SyncBN option; VICReg's statistics over the gathered embeddings, Barlow's cross-correlation summed)
the mean of the ranks' losses, every parameter's gradient after DDP's all-reduce and the state after
the step (BatchNorm running statistics, EMA targets, MoCo's queue) equal the single process's to
1e-6. Each rank's loss is a mean over its own B/2 samples, so DDP's gradient average is the global
mean because the local batches are equal. MoCo v2's Shuffle-BN is checked for what it promises
instead: each key is normalised over the shuffled share its rank drew, not over its query's sub-batch.
wav2vec 2.0 is checked with 1 clip per rank against 2 clips on one rank (see ``test_wav2vec2``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import METHOD_CONFIGS, Wav2Vec2Config
from selfsup.core.distributed import convert_sync_batchnorm
from selfsup.core.objective import Progress
from selfsup.methods import build_method
from selfsup.vision.backbones import build_backbone
from tests.clusterkit import free_port

pytestmark = pytest.mark.integration

WORLD, BATCH = 2, 8  # global batch; each rank takes BATCH // WORLD
PROGRESS = Progress(3, 10, 5)
CASES = {  # name: method config (small heads for a width-8 ResNet-18, feature dimension 64)
    "simclr": dict(name="simclr", proj_hidden_dim=16, proj_dim=8),
    "moco_v2_sync_bn": dict(
        name="moco_v2", queue_size=32, proj_hidden_dim=16, proj_dim=8, shuffle_bn=False, sync_bn=True, momentum=0.9
    ),
    "moco_v3": dict(name="moco_v3", proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16),
    "byol": dict(name="byol", proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16),
    "simsiam": dict(name="simsiam", proj_dim=16, proj_hidden_dim=16, pred_hidden_dim=4),
    "vicreg": dict(name="vicreg", proj_hidden_dim=16, proj_dim=16),  # variance, covariance: gathered
    "barlow_twins": dict(name="barlow_twins", proj_hidden_dim=16, proj_dim=16),  # cross-correlation: summed
    "dino": dict(
        name="dino", out_dim=16, hidden_dim=16, bottleneck_dim=8, use_bn_in_head=True, freeze_last_layer_epochs=0
    ),  # center: all-reduced; teacher head BN: global
}
MULTI_CROP = {"simclr", "byol", "dino"}  # also run with 3 local views of 8 px beside the two of 16 px
CASES.update({f"{name}_multi_crop": CASES[name] for name in sorted(MULTI_CROP)})
SHUFFLE = dict(name="moco_v2", queue_size=32, proj_hidden_dim=16, proj_dim=8)  # the default: Shuffle-BN


def build(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=8, in_channels=1)
    return build_method(METHOD_CONFIGS[cfg["name"]](**cfg), backbone, dim).double()


def views(local: int = 0) -> list[torch.Tensor]:
    """Two global views of 16 px, then ``local`` views of 8 px."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(local)
    ]


def share(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def vision_step(name: str, rank: int, world: int) -> dict:
    """One forward/backward/on_after_step on this rank's share of the views (DDP when world > 1):
    this rank's loss, the all-reduced gradients and the state afterwards."""
    method = build(CASES[name])
    model = method
    if world > 1:
        if method.sync_batchnorm:
            method = convert_sync_batchnorm(method, torch.device("cpu"))
        model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    local = 3 if name.endswith("_multi_crop") else 0
    loss = model([share(v, rank, world) for v in views(local)], PROGRESS)["loss"]
    loss.backward()
    method.on_after_step(PROGRESS, torch.tensor(True))
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "state": method.state_dict()}


def shuffled_keys(rank: int, world: int) -> dict:
    """MoCo v2's keys of the global batch's second views, with Shuffle-BN, and the permutation used."""
    method = build(SHUFFLE)
    torch.manual_seed(5 + rank)  # a different stream on each rank: only rank 0's permutation counts
    keys = method.all_keys(share(views()[1], rank, world))
    torch.manual_seed(5)
    return {"keys": keys, "order": torch.rand(BATCH).argsort()}


def wav2vec2_cfg() -> Wav2Vec2Config:
    """A tiny model whose loss is the contrastive term alone: fairseq's diversity and feature penalty
    are means over each rank's own batch (the codebook perplexity is not additive over clips), so
    they are per-rank terms by design, weighted by the rank's masked frames as fairseq weights them."""
    return Wav2Vec2Config.tiny().model_copy(
        update=dict(
            conv_channels=16,
            embed_dim=32,
            ffn_dim=64,
            pos_conv_kernel=8,
            pos_conv_groups=4,
            codebook_entries=16,
            codevector_dim=16,
            final_dim=16,
            num_negatives=2,
            diversity_weight=0.0,
            feature_penalty_weight=0.0,
        )
    )


def wav2vec2_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 0.5 s clips, a fixed mask with 3 and 5 masked frames (unequal on purpose) and fixed
    distractors among each clip's masked frames: the randomness both set-ups must share."""
    g = torch.Generator().manual_seed(2)
    waves = 0.1 * torch.randn(2, 8000, generator=g, dtype=torch.float64)
    lengths = torch.tensor([8000, 8000])
    frames = Wav2Vec2Pretraining(wav2vec2_cfg()).encoder.extract_features(waves.float(), lengths)[1][0].item()
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[0, [2, 3, 9]] = True
    mask[1, [1, 5, 6, 12, 13]] = True
    negatives = torch.stack(
        [torch.nonzero(row).flatten()[torch.randint(int(row.sum()), (frames, 2), generator=g)] for row in mask]
    )
    return waves, lengths, mask, negatives


def wav2vec2_step(rank: int, world: int) -> dict:
    """wav2vec 2.0's loss on this rank's clips and its gradients averaged over ranks as DDP does
    (``step`` takes the fixed mask and distractors; eval mode: no Gumbel noise, no dropout)."""
    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(wav2vec2_cfg()).double().eval()
    inputs = [share(t, rank, world) for t in wav2vec2_inputs()]
    loss = model.step(*inputs).metrics["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return {"loss": loss.detach(), "grads": grads}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: vision_step(name, rank, WORLD) for name in CASES}
        results["shuffle_bn"] = shuffled_keys(rank, WORLD)
        results["wav2vec2"] = wav2vec2_step(rank, WORLD)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("world")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_with_the_papers_batchnorm(ranks, name):
    torch.set_num_threads(1)
    one = vision_step(name, 0, 1)
    close(sum(r[name]["loss"] for r in ranks) / WORLD, one["loss"], "loss")
    for r in ranks:
        assert r[name]["grads"].keys() == one["grads"].keys()
        for n, g in one["grads"].items():
            close(r[name]["grads"][n], g, f"gradient of {n}")
        for k, v in one["state"].items():  # running statistics, EMA targets, queue and its pointer
            close(r[name]["state"][k], v, f"state {k}")


def test_shuffle_bn_normalises_each_key_over_its_shuffled_share_not_its_querys(ranks):
    method = build(SHUFFLE)
    order = ranks[0]["shuffle_bn"]["order"]  # rank 0 drew it and broadcast it
    x2 = views()[1]
    expected = torch.empty(BATCH, SHUFFLE["proj_dim"], dtype=torch.float64)
    for r in range(WORLD):  # rank r's key pass: BatchNorm over the images of its share of the permutation
        expected[share(order, r, WORLD)] = method.keys(x2[share(order, r, WORLD)])
    for r in ranks:
        close(r["shuffle_bn"]["keys"], expected, "Shuffle-BN keys")
    for r in range(WORLD):  # a query is normalised over its rank's sub-batch; its key over another one
        query_batch = set(range(r * BATCH // WORLD, (r + 1) * BATCH // WORLD))
        for i in query_batch:
            key_batch = next(
                set(share(order, s, WORLD).tolist()) for s in range(WORLD) if i in share(order, s, WORLD).tolist()
            )
            assert key_batch != query_batch
    unshuffled = torch.cat([method.keys(share(x2, r, WORLD)) for r in range(WORLD)])
    assert not torch.allclose(expected, unshuffled, atol=1e-3)  # the statistics a query's own batch gives


def test_wav2vec2_two_ranks_of_one_clip_equal_one_rank_of_two(ranks):
    """With 3 and 5 masked frames on the two ranks, each masked frame of the global batch still counts
    the same (fairseq's normalisation by the global number of masked frames)."""
    torch.set_num_threads(1)
    one = wav2vec2_step(0, 1)
    close(sum(r["wav2vec2"]["loss"] for r in ranks) / WORLD, one["loss"], "loss")
    for r in ranks:
        assert r["wav2vec2"]["grads"].keys() == one["grads"].keys()
        for n, g in one["grads"].items():
            close(r["wav2vec2"]["grads"][n], g, f"gradient of {n}")
