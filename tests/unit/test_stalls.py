"""Zero host stalls per quiet training step, for every objective, counted on the CPU by
``tests.stalls.HostStalls`` inside ``Trainer.step`` and the loop's work after it, with rejected (NaN)
steps among the accepted ones. Logging steps read their metrics on the host by design."""

from __future__ import annotations

import pytest
import torch

from selfsup.cluster.in_process import build_trainer
from selfsup.data.views import DeviceCrops
from tests.helpers import tiny_jpeg_run
from tests.stalls import Exemption, HostStalls, at_code, in_torch_function
from tests.unit.test_bad_steps import HEADS, audio_config, small_backbone, tiny_config

EXEMPT = [
    Exemption(
        "fused AdamW's CPU step counter",
        "torch adds torch.tensor(1.0) to the step counters only when they are CPU tensors "
        "(torch/optim/adam.py _fused_adam); on a GPU it adds the Python number 1",
        in_torch_function("_fused_adam"),
    ),
    Exemption(
        "F.one_hot's range check",
        "torch reads the class indices' min and max (.item()) for CPU tensors only "
        "(aten/src/ATen/native/Onehot.cpp); on CUDA a device-side assert checks them",
        at_code("F.one_hot("),
    ),
]
HOST_BATCH = [  # DeviceCrops' work on the loader's batch metadata, CPU tensors on a GPU machine too
    Exemption(
        "cut_boxes' group index",
        "built from Python ints on the host and copied pinned and asynchronously (selfsup.data.views._on): "
        "the host does not wait for the GPU",
        at_code("_on(boxes.device, torch.tensor(members))"),
    ),
    Exemption(
        "the batch's index metadata",
        "crop_index / jpeg_index are CPU tensors of the loader's batch: comparing them reads host memory",
        at_code("torch.equal(parts[0][0]"),
    ),
]
PRESETS = {
    "simclr": "simclr",
    "moco_v2": "moco-v2",
    "moco_v3": "byol",
    "byol": "byol",
    "simsiam": "moco-v2",
    "vicreg": "byol",
    "barlow_twins": "byol",
}  # as their papers augment
# DINO's multi-crop at 28 px: its two global views, then two local views of 12 px (DINO's 96/224)
VIEWS = {
    "dino": "augment.views=[{jitter_p: 0.8, grayscale_p: 0.2, blur_p: 1.0}, {jitter_p: 0.8, grayscale_p: 0.2, "
    "blur_p: 0.1, solarize_p: 0.2}, {size: 12, copies: 2, crop_scale: [0.05, 0.4], jitter_p: 0.8, "
    "blur_p: 0.5}]"
}


def count_stalls(
    cfg, bad_calls: set[int], exempt: list[Exemption] = EXEMPT
) -> tuple[list[list], list[list], list[int]]:
    """Trains ``cfg`` to its end, the loss NaN on the forward calls in ``bad_calls`` (1-based). Returns
    the stalls of each step, those of the loop's work after each quiet step, and the logging steps."""
    trainer = build_trainer(cfg)
    forward, calls = trainer.objective.forward, [0]

    def sometimes_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.objective.forward = sometimes_nan
    in_step, after, logged = [], [], []
    step, after_step = trainer.step, trainer._after_step

    def counted_step(batch):
        with HostStalls(exempt) as mode:
            out = step(batch)
        in_step.append(mode.stalls)
        return out

    def counted_after(out, epoch, in_epoch):
        logging = trainer.steps_done % cfg.train.log_every_steps == 0 or in_epoch == trainer._epoch_steps(epoch)
        with HostStalls(exempt) as mode:
            after_step(out, epoch, in_epoch)
        if logging:
            logged.append(trainer.steps_done)
        else:
            after.append(mode.stalls)
        return None

    trainer.step, trainer._after_step = counted_step, counted_after
    summary = trainer.fit()
    assert summary["bad_steps"] == len(bad_calls)
    return in_step, after, logged


@pytest.mark.parametrize("name", [*HEADS, "wav2vec2"])
def test_no_host_stall_in_a_quiet_step(tmp_path, monkeypatch, name):
    if name == "wav2vec2":
        cfg = audio_config(tmp_path)
        bad = {2}
    else:  # RGB images and the method's own preset, so the colour jitter (hue included) runs; a small
        # backbone (the ResNet's convolutions read nothing on the host: the JPEG test below runs one)
        monkeypatch.setattr("selfsup.tasks.vision.build_backbone", small_backbone)
        cfg = tiny_config(
            tmp_path,
            f"method.name={name}",
            *HEADS[name],
            "model.width=8",
            "data.channels=3",
            VIEWS[name] if name in VIEWS else f"augment.preset={PRESETS[name]}",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]",
            "train.log_every_steps=4",
            "optim.max_bad_steps=5",
        )
        bad = {1, 2, 6}
    in_step, after, logged = count_stalls(cfg, bad)
    assert len(in_step) == cfg.optim.epochs * len(after + logged) and after
    per_step = [len(s) for s in in_step]
    assert per_step == [0] * len(in_step), "\n".join(str(s) for s in {str(s) for steps in in_step for s in steps})
    assert [len(s) for s in after] == [0] * len(after), "\n".join(str(s) for steps in after for s in steps)


def test_the_detector_finds_each_kind_and_names_its_line():
    x = torch.arange(6.0)
    with HostStalls([Exemption("one named", "a test of the exemptions", at_code("x.sum().item()"))]) as mode:
        float(x.max())  # a scalar read
        torch.tensor([1.0, 2.0])  # from Python data
        x.nonzero()  # data-dependent shapes
        x[x > 2]
        x.sum().item()  # exempt
        x * 2 + torch.full((), 3.0)  # none: a factory and a Python number
    assert [(s.kind, s.op) for s in mode.stalls] == [
        ("scalar read", "_local_scalar_dense"),
        ("from Python data", "lift_fresh"),
        ("data-dependent shape", "nonzero"),
        ("data-dependent shape", "index"),
    ]
    assert mode.stalls[0].site.file == __file__ and "float(x.max())" in mode.stalls[0].site.code
    assert mode.exempt == {"one named": 1}


def test_no_host_stall_decoding_jpegs_on_the_device(jpeg_shards, tmp_path, monkeypatch):
    """The device decode path (data.decode=gpu: DeviceCrops decodes and cuts the JPEGs inside the step),
    here on the CPU: what it reads on the host is the loader's batch metadata, never a device value."""
    monkeypatch.setattr("selfsup.tasks.vision.decode_on_device", lambda cfg: True)
    cut, decoded = DeviceCrops.cut_jpegs, []
    monkeypatch.setattr(DeviceCrops, "cut_jpegs", lambda self, batch: decoded.append(1) or cut(self, batch))
    cfg = tiny_jpeg_run(jpeg_shards, tmp_path, "train.log_every_steps=2", "tracking.mode=disabled")
    in_step, after, _ = count_stalls(cfg, bad_calls={2}, exempt=EXEMPT + HOST_BATCH)
    assert len(in_step) == 3 and [len(s) for s in in_step] == [0] * 3, "\n".join(
        str(s) for steps in in_step for s in steps
    )
    assert [len(s) for s in after] == [0] * len(after)
    assert len(decoded) == 3  # every step decoded its batch's JPEGs inside the step
