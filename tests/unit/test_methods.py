"""The vision methods against independent formulas: losses, gradient flow, momentum updates, MoCo's queue.

Embeddings come from calling each method's heads directly; the reference losses are explicit loops
in float64 numpy, so a wrong sign, pairing, temperature or stop-gradient in the method shows up.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.config import METHOD_CONFIGS, BYOLConfig, MoCoV2Config, MoCoV3Config, SimSiamConfig
from selfsup.core.objective import Progress
from selfsup.methods import METHODS, build_method
from selfsup.methods.byol import BYOL
from selfsup.methods.losses import nt_xent
from selfsup.methods.moco import MoCoV2, MoCoV3
from selfsup.methods.momentum import cosine_momentum, momentum_copy, update_momentum
from selfsup.methods.simsiam import SimSiam
from selfsup.vision.backbones import build_backbone

BATCH = 4
SMALL = {
    "moco_v2": {"queue_size": 16},  # settings that keep the defaults' heads small enough for a unit test
    "vicreg": {"proj_hidden_dim": 32, "proj_dim": 32},
    "barlow_twins": {"proj_hidden_dim": 32, "proj_dim": 32},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
}
MID = Progress(step=5, total_steps=10, steps_per_epoch=5)  # fraction 0.5, epoch 1
ACCEPTED = torch.tensor(True)


def views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 1, 8, 8, generator=g), torch.randn(BATCH, 1, 8, 8, generator=g)]


def linear_backbone() -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), 8


def make(method_cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    backbone, dim = linear_backbone()
    return method_cls(backbone, dim, cfg)


def numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(unit(a) @ unit(b))


def cross_entropy(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(x - top) for x in logits)))


# ---- reference formulas, one sample at a time ----


def ref_nt_xent(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    e = [unit(v) for v in np.concatenate([z1, z2])]
    n, b = len(e), len(z1)
    losses = []
    for i in range(n):
        positive = (i + b) % n
        others = [j for j in range(n) if j != i]
        logits = [float(e[i] @ e[j]) / t for j in others]
        losses.append(cross_entropy(logits, others.index(positive)))
    return sum(losses) / n


def ref_multi_positive_nt_xent(zs: list[np.ndarray], t: float) -> float:
    """Each anchor: −log(Σ over its sample's other views exp(cos/t) / Σ over every other embedding exp(cos/t))."""
    e = [unit(v) for z in zs for v in z]
    b, n = len(zs[0]), len(e)
    losses = []
    for i in range(n):
        terms = {j: math.exp(float(e[i] @ e[j]) / t) for j in range(n) if j != i}
        losses.append(-math.log(sum(v for j, v in terms.items() if j % b == i % b) / sum(terms.values())))
    return sum(losses) / n


def ref_moco_v2(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    losses = []
    for i in range(len(q)):
        logits = [cos(q[i], k[i]) / t] + [cos(q[i], neg) / t for neg in queue]
        losses.append(cross_entropy(logits, 0))
    return sum(losses) / len(q)


def ref_moco_v3_ctr(q: np.ndarray, k: np.ndarray, t: float) -> float:
    losses = [cross_entropy([cos(q[i], k[j]) / t for j in range(len(k))], i) for i in range(len(q))]
    return 2 * t * sum(losses) / len(q)


def ref_byol(p: np.ndarray, z: np.ndarray) -> float:
    return sum(float(np.sum((unit(p[i]) - unit(z[i])) ** 2)) for i in range(len(p))) / len(p)


def ref_simsiam_d(p: np.ndarray, z: np.ndarray) -> float:
    return -sum(cos(p[i], z[i]) for i in range(len(p))) / len(p)


# ---- losses equal the reference ----


def test_nt_xent_matches_explicit_formula():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    loss = nt_xent([z1, z2], temperature=0.5)
    assert loss.item() == pytest.approx(ref_nt_xent(numpy(z1), numpy(z2), 0.5), abs=1e-5)
    z3, z4 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert nt_xent([z1, z2, z3, z4], 0.5).item() == pytest.approx(
        ref_multi_positive_nt_xent([numpy(z) for z in (z1, z2, z3, z4)], 0.5), abs=1e-5
    )


def multi_crop_views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return views(seed) + [torch.randn(BATCH, 1, 4, 4, generator=g) for _ in range(3)]


def pooled_backbone() -> tuple[nn.Module, int]:
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 8)), 8


def test_simclr_multi_crop_runs_each_size_as_one_batch_with_every_view_a_positive():
    from selfsup.config import SimCLRConfig

    torch.manual_seed(0)
    method = build_method(SimCLRConfig(proj_hidden_dim=16, proj_dim=5), *pooled_backbone())
    shapes = []
    method.encoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    x = multi_crop_views()
    out = method(x, MID)
    assert shapes == [(2 * BATCH, 1, 8, 8), (3 * BATCH, 1, 4, 4)]
    with torch.no_grad():
        z = method.projector(torch.cat([method.encoder(torch.cat(x[:2])), method.encoder(torch.cat(x[2:]))]))
    expected = ref_multi_positive_nt_xent([numpy(part) for part in z.split(BATCH)], 0.2)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_byol_multi_crop_regresses_every_other_view_onto_each_global_target():
    torch.manual_seed(0)
    method = build_method(BYOLConfig(proj_hidden_dim=16, proj_dim=5, pred_hidden_dim=12), *pooled_backbone())
    x = multi_crop_views()
    with torch.no_grad():
        z = [method.projector(method.encoder(v)) for v in x[:2]]
        z += list(method.projector(method.encoder(torch.cat(x[2:]))).split(BATCH))  # locals: one batch
        p = [numpy(method.predictor(zv)) for zv in z]
        t = [numpy(method.target_projector(method.target_encoder(v))) for v in x[:2]]
    expected = sum(ref_byol(p[v], t[g]) for g in range(2) for v in range(5) if v != g)
    assert method(x, MID)["loss"].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_v2_loss_matches_explicit_formula(symmetric):
    cfg = MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5, symmetric=symmetric)
    method = make(MoCoV2, cfg)
    x1, x2 = views()
    queue = numpy(method.queue)
    with torch.no_grad():
        q1, q2 = (numpy(method.projector(method.encoder(x))) for x in (x1, x2))
        k1, k2 = (numpy(method.key_projector(method.key_encoder(x))) for x in (x1, x2))
    expected = ref_moco_v2(q1, k2, queue, 0.2)
    if symmetric:
        expected += ref_moco_v2(q2, k1, queue, 0.2)
    out = method([x1, x2], MID)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert out["embedding"].shape == (len(x1), q1.shape[1]) and not out["embedding"].requires_grad


def test_moco_v3_loss_matches_explicit_formula():
    cfg = MoCoV3Config(temperature=0.5, proj_hidden_dim=16, proj_dim=5, pred_hidden_dim=12)
    method = make(MoCoV3, cfg)
    x1, x2 = views()
    with torch.no_grad():
        q1, q2 = (numpy(method.predictor(method.projector(method.encoder(x)))) for x in (x1, x2))
        k1, k2 = (numpy(method.key_projector(method.key_encoder(x))) for x in (x1, x2))
    expected = ref_moco_v3_ctr(q1, k2, 0.5) + ref_moco_v3_ctr(q2, k1, 0.5)
    assert method([x1, x2], MID)["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_byol_loss_matches_explicit_formula():
    method = make(BYOL, BYOLConfig(proj_hidden_dim=16, proj_dim=5, pred_hidden_dim=12))
    x1, x2 = views()
    with torch.no_grad():
        p1, p2 = (numpy(method.predictor(method.projector(method.encoder(x)))) for x in (x1, x2))
        t1, t2 = (numpy(method.target_projector(method.target_encoder(x))) for x in (x1, x2))
    expected = ref_byol(p1, t2) + ref_byol(p2, t1)
    assert method([x1, x2], MID)["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_simsiam_loss_matches_explicit_formula():
    method = make(SimSiam, SimSiamConfig(proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=2))
    x1, x2 = views()
    with torch.no_grad():
        z1, z2 = (method.projector(method.encoder(x)) for x in (x1, x2))
        p1, p2 = (numpy(method.predictor(z)) for z in (z1, z2))
    expected = ref_simsiam_d(p1, numpy(z2)) / 2 + ref_simsiam_d(p2, numpy(z1)) / 2
    assert method([x1, x2], MID)["loss"].item() == pytest.approx(expected, abs=1e-5)


# ---- gradient flow and momentum updates ----


def momentum_methods():
    return {
        "moco_v2": (
            make(MoCoV2, MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5, momentum=0.9)),
            ("key_encoder", "key_projector"),
            0.9,
        ),
        "moco_v3": (
            make(MoCoV3, MoCoV3Config(proj_hidden_dim=16, proj_dim=5, momentum_base=0.9)),
            ("key_encoder", "key_projector"),
            1 - 0.1 / 2,
        ),  # cosine at half-way: 1 − (1 − 0.9)/2
        "byol": (
            make(BYOL, BYOLConfig(proj_hidden_dim=16, proj_dim=5, tau_base=0.9)),
            ("target_encoder", "target_projector"),
            1 - 0.1 / 2,
        ),
    }


ONLINE_OF = {
    "key_encoder": "encoder",
    "key_projector": "projector",
    "target_encoder": "encoder",
    "target_projector": "projector",
}


def sgd_step(method: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(method.param_groups(), lr=0.5)
    opt.zero_grad()
    method(views(), MID)["loss"].backward()
    opt.step()
    return opt


@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol"])
def test_sgd_step_trains_online_network_and_leaves_target_alone(name):
    method, target_names, _ = momentum_methods()[name]
    targets = [getattr(method, n) for n in target_names]
    target_before = [p.detach().clone() for t in targets for p in t.parameters()]
    online_before = [p.detach().clone() for p in method.encoder.parameters()]
    trained = {id(p) for g in method.param_groups() for p in g["params"]}

    sgd_step(method)

    target_params = [p for t in targets for p in t.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target_params)
    assert not trained & {id(p) for p in target_params}
    assert all(torch.equal(p, b) for p, b in zip(target_params, target_before))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(method.encoder.parameters(), online_before))


@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol"])
def test_on_after_step_is_ema_of_online_weights(name):
    method, target_names, m = momentum_methods()[name]
    sgd_step(method)
    pairs = [(getattr(method, n), getattr(method, ONLINE_OF[n])) for n in target_names]
    before = [[p.detach().clone() for p in t.parameters()] for t, _ in pairs]
    method.on_after_step(MID, ACCEPTED)
    for (target, online), target_before in zip(pairs, before):
        for t, o, tb in zip(target.parameters(), online.parameters(), target_before):
            torch.testing.assert_close(t, m * tb + (1 - m) * o.detach(), atol=1e-6, rtol=0)
            # a bias feeding a BatchNorm gets (next to) no gradient: its online copy may not have moved
            assert torch.allclose(o, tb, rtol=0, atol=1e-6) or not torch.equal(t, tb)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, Progress(0, 100)) == pytest.approx(0.99)
    assert cosine_momentum(0.99, Progress(50, 100)) == pytest.approx(0.995)
    assert cosine_momentum(0.99, Progress(25, 100)) == pytest.approx(1 - 0.01 * (1 + math.sqrt(0.5)) / 2)
    assert cosine_momentum(0.99, Progress(100, 100)) == pytest.approx(1.0)


def test_simsiam_stop_gradient_matches_manual_gradient():
    method = make(SimSiam, SimSiamConfig(proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=2))
    x1, x2 = views()
    weight = method.encoder[1].weight

    def manual_grad(stop_gradient: bool) -> torch.Tensor:
        z1, z2 = (method.projector(method.encoder(x)) for x in (x1, x2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        loss = -(nn.functional.cosine_similarity(p1, t2).mean() + nn.functional.cosine_similarity(p2, t1).mean()) / 2
        return torch.autograd.grad(loss, weight)[0]

    with_stop, without_stop = manual_grad(True), manual_grad(False)
    method([x1, x2], MID)["loss"].backward()
    torch.testing.assert_close(weight.grad, with_stop, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(weight.grad, without_stop, atol=1e-4)
    groups = method.param_groups()
    assert [g.get("fixed_lr", False) for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.predictor.parameters()}
    assert all(p.grad is not None for p in method.predictor.parameters())


# ---- MoCo v2's queue ----


def test_moco_v2_enqueues_newest_keys_at_pointer():
    method = make(MoCoV2, MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5))
    for step in range(3):  # 3 x 4 keys into 8 slots: the third batch overwrites slots 0-3
        x1, x2 = views(seed=step)
        start = method.queue_ptr.item()
        untouched = method.queue[4 - start : 8 - start].clone()
        with torch.no_grad():
            keys = method.key_projector(method.key_encoder(x2))
        method([x1, x2], MID)
        assert method.queue_ptr.item() == start  # nothing enqueued before the step is accepted
        method.on_after_step(MID, ACCEPTED)
        torch.testing.assert_close(method.queue[start : start + 4], nn.functional.normalize(keys, dim=1))
        torch.testing.assert_close(method.queue[4 - start : 8 - start], untouched)
        assert method.queue_ptr.item() == (start + 4) % 8
    assert method.queue_ptr.item() == 4


def test_moco_v2_queue_must_divide_by_keys_per_step():
    with pytest.raises(ValueError, match="divisible"):
        make(MoCoV2, MoCoV2Config(queue_size=10, proj_hidden_dim=16, proj_dim=5))(views(), MID)
    symmetric = make(MoCoV2, MoCoV2Config(queue_size=12, proj_hidden_dim=16, proj_dim=5, symmetric=True))
    with pytest.raises(ValueError, match="x 2 views = 8"):
        symmetric(views(), MID)


def test_moco_v2_queue_is_checkpointed():
    method = make(MoCoV2, MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5))
    method(views(), MID)
    method.on_after_step(MID, ACCEPTED)
    state = method.state_dict()
    restored = make(MoCoV2, MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5), seed=1)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue, method.queue) and restored.queue_ptr.item() == 4


def test_moco_v2_shuffle_bn_on_one_rank_normalises_keys_over_shuffled_halves():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    method = MoCoV2(backbone, 8, MoCoV2Config(queue_size=8, proj_hidden_dim=16, proj_dim=5))
    x = torch.randn(8, 1, 8, 8)
    torch.manual_seed(7)
    keys = method.all_keys(x)
    torch.manual_seed(7)
    order = torch.rand(8).argsort()  # the permutation all_keys draws
    halves = [method.keys(x[order[:4]]), method.keys(x[order[4:]])]  # each half with its own BN statistics
    expected = torch.cat(halves)[torch.argsort(order)]
    torch.testing.assert_close(keys, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(keys, method.keys(x), atol=1e-3)  # not the statistics of the whole batch


def test_bn_mode_defaults_follow_the_papers_and_both_at_once_is_refused():
    from selfsup.config import ConfigError, parse_config

    sync = {
        name: build_method(cfg_cls(**SMALL.get(name, {})), *linear_backbone()).sync_batchnorm
        for name, cfg_cls in METHOD_CONFIGS.items()
        if cfg_cls.data_kind == "image"
    }
    assert sync == {
        "simclr": True,
        "moco_v2": False,
        "moco_v3": True,
        "byol": True,
        "simsiam": True,
        "vicreg": True,
        "barlow_twins": True,
        "dino": True,
    }
    assert MoCoV2Config().shuffle_bn and not MoCoV2Config().sync_bn
    assert build_method(MoCoV2Config(shuffle_bn=False, sync_bn=True), *linear_backbone()).sync_batchnorm
    tree = {"name": "t", "data": {"train": "x"}, "method": {"name": "moco_v2"}}
    with pytest.raises(ConfigError) as err:
        parse_config(tree, ["method.sync_bn=true"])
    assert "method.shuffle_bn and method.sync_bn are both true" in str(err.value)
    parse_config(tree, ["method.sync_bn=true", "method.shuffle_bn=false"])


def test_global_batchnorm_conversion_keeps_parameters_buffers_and_keys():
    from selfsup.core.distributed import GlobalBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=8, in_channels=1)
    method = build_method(METHOD_CONFIGS["byol"](), backbone, dim)
    plain = copy.deepcopy(method)
    before = method.state_dict(keep_vars=True)
    converted = convert_sync_batchnorm(method, torch.device("cpu"))
    after = converted.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm)
        for m in converted.modules()
    )
    assert converted.target_encoder.bn1.weight.requires_grad is False  # frozen copies stay frozen
    x = torch.randn(4, 1, 16, 16)  # one rank: plain BatchNorm, running statistics included
    torch.testing.assert_close(converted.encoder(x), plain.encoder(x))
    torch.testing.assert_close(converted.encoder.state_dict(), plain.encoder.state_dict())


@pytest.mark.parametrize("name", ["simclr", "byol", "dino"])
def test_the_cuda_conversion_to_sync_batchnorm_keeps_parameters_buffers_and_keys(name):
    """The CUDA branch of convert_sync_batchnorm (torch's SyncBatchNorm), converted on the CPU as the
    trainer converts before moving to the GPU: the same parameters, buffers and keys, frozen copies frozen."""
    from selfsup.core.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=8, in_channels=1)
    method = build_method(METHOD_CONFIGS[name](**SMALL.get(name, {})), backbone, dim)
    before = method.state_dict(keep_vars=True)
    frozen = {k for k, v in method.named_parameters() if not v.requires_grad}
    converted = convert_sync_batchnorm(method, torch.device("cuda", 0))
    after = converted.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert {k for k, v in converted.named_parameters() if not v.requires_grad} == frozen


# ---- registry and a real backbone ----


def test_registry_names_match_config_literals():
    for name, cfg_cls in METHOD_CONFIGS.items():
        assert cfg_cls().name == name
    assert set(METHODS) == {name for name, cfg_cls in METHOD_CONFIGS.items() if cfg_cls.data_kind == "image"}
    with pytest.raises(ValueError):
        BYOLConfig(tau=0.9)


@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol", "simsiam", "vicreg", "barlow_twins", "dino"])
def test_resnet_backbone_trains_one_step(name):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=4, in_channels=1)
    cfg_cls = METHOD_CONFIGS[name]
    method = build_method(cfg_cls(**SMALL.get(name, {})), backbone, dim)
    assert method.encoder is backbone
    sgd_step(method)
    method.on_after_step(MID, ACCEPTED)
    out = method(views(), MID)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert all(v.ndim == 0 and not v.requires_grad for k, v in out.items() if k not in ("loss", "embedding"))


def test_embedding_stats_spot_collapse():
    from selfsup.core.collapse import embedding_stats

    spread = embedding_stats(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
    collapsed = embedding_stats(torch.ones(256, 64) + 1e-4 * torch.randn(256, 64))
    assert spread["embed_std"].item() == pytest.approx(64**-0.5, rel=0.1)
    assert spread["rankme"].item() > 50
    assert collapsed["embed_std"].item() < 0.01 and collapsed["rankme"].item() < 20


def test_update_momentum_moves_the_target_only_on_accepted_steps():
    online = nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        online.bias.fill_(4.0)
    target = momentum_copy(online)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[3.0, 6.0]]))
        online.bias.fill_(0.0)
    update_momentum(target, online, 0.75, accepted=torch.tensor(False))
    assert target.weight.tolist() == [[1.0, 2.0]] and target.bias.tolist() == [4.0]
    update_momentum(target, online, 0.75, accepted=torch.tensor(True))  # 0.75·target + 0.25·online
    assert target.weight.tolist() == [[1.5, 3.0]] and target.bias.tolist() == [3.0]
    update_momentum(target, online, 0.5)
    assert target.weight.tolist() == [[2.25, 4.5]] and target.bias.tolist() == [1.5]
