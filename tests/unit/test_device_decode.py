"""The GPU JPEG decode's own failures, on the CPU with stand-ins for nvJPEG: out of memory and CUDA
errors stop the run with one line naming the settings to change (never grey images), a missing nvJPEG
is said once, and the decode fallbacks reach the data health of the records and the summary."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from selfsup.config import load_config
from selfsup.data import views as views_module
from selfsup.data.views import DeviceCrops, DeviceDecodeError, collate_views, nvjpeg_problem
from selfsup.tasks import vision as vision_module
from selfsup.tasks.vision import decode_on_device
from tests.helpers import fit, tiny_jpeg_run
from tests.unit.test_jpeg_views import both_paths, raw_samples

OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")


def stand_in(real, fail_batch: Exception | None = None, fail_one: Exception | None = None):
    """decode_jpeg that raises ``fail_batch`` for a batched call and ``fail_one`` for a single JPEG."""

    def decode(data, **kw):
        error = fail_batch if isinstance(data, list) else fail_one
        if error is not None:
            raise error
        return real(data, **kw)

    return decode


@pytest.mark.parametrize(
    "fail_batch, fail_one, what",
    [
        (OOM, None, "ran out of memory"),  # the batched nvJPEG call
        (RuntimeError("nvjpeg: bad huffman table"), OOM, "ran out of memory"),  # one by one after a bad batch
        (
            torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
            None,
            "failed (AcceleratorError: CUDA error: an illegal memory access was encountered)",
        ),
    ],
)
def test_the_devices_own_failure_is_one_line_never_grey_images(jpeg_shards, monkeypatch, fail_batch, fail_one, what):
    _, encoded = both_paths(raw_samples(jpeg_shards)[:4], 32, seed=0)
    monkeypatch.setattr(views_module, "decode_jpeg", stand_in(views_module.decode_jpeg, fail_batch, fail_one))
    crops = DeviceCrops([32, 32], 3, torch.device("cpu"))
    with pytest.raises(DeviceDecodeError) as err:
        crops(collate_views(encoded))
    assert str(err.value) == (
        f"decoding a batch of 4 JPEGs on cpu {what}: set data.decode=cpu to decode in the "
        "loader workers, or lower data.batch_size"
    )
    assert crops.health.decode_fallbacks == 0 and crops.health.decode_failed == 0


def test_out_of_memory_cutting_the_views_is_the_same_line(jpeg_shards, monkeypatch):
    _, encoded = both_paths(raw_samples(jpeg_shards)[:2], 32, seed=0)

    def roi_align(*args, **kwargs):
        raise OOM

    monkeypatch.setattr(views_module, "roi_align", roi_align)
    with pytest.raises(DeviceDecodeError, match="on cpu ran out of memory: set data.decode=cpu"):
        DeviceCrops([32, 32], 3, torch.device("cpu"))(collate_views(encoded))


def test_a_missing_nvjpeg_falls_back_with_one_warning_under_auto_and_stops_under_gpu(monkeypatch, caplog):
    cfg = load_config("simclr-resnet50-imagenet", ["scaling.use_gpu=true", "data.decode=auto"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    missing = RuntimeError("torchvision.io.decode_jpeg: not compiled with nvjpeg support\nmore")
    monkeypatch.setattr(views_module, "decode_jpeg", stand_in(views_module.decode_jpeg, missing, missing))
    nvjpeg_problem.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="selfsup.data"):
            assert decode_on_device(cfg) is False
        assert [r.getMessage() for r in caplog.records] == [
            "data.decode=auto: this torchvision cannot decode JPEGs on the GPU (RuntimeError: torchvision.io."
            "decode_jpeg: not compiled with nvjpeg support); they are decoded in the loader workers (set "
            "data.decode=cpu to say so)"
        ]
        gpu = cfg.model_copy(update={"data": cfg.data.model_copy(update={"decode": "gpu"})})
        with pytest.raises(
            DeviceDecodeError,
            match=r"^data.decode=gpu: this torchvision cannot decode JPEGs on "
            r"the GPU \(RuntimeError: .*\); set data.decode=cpu, or install",
        ):
            decode_on_device(gpu)
        monkeypatch.setattr(views_module, "decode_jpeg", lambda data, **kw: torch.zeros((3, 8, 8), dtype=torch.uint8))
        nvjpeg_problem.cache_clear()  # a GPU whose nvJPEG decodes
        assert decode_on_device(cfg) is True and decode_on_device(gpu) is True
    finally:
        nvjpeg_problem.cache_clear()


def test_decode_fallbacks_reach_the_records_and_the_summary(jpeg_shards, tmp_path, monkeypatch, caplog):
    """The device path on the CPU, nvJPEG standing in as one that rejects every other JPEG."""
    real, rejected = views_module.decode_jpeg, [0]

    def picky(data, **kw):
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: unsupported")
        rejected[0] += 1
        if rejected[0] % 2:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(views_module, "decode_jpeg", picky)
    monkeypatch.setattr(vision_module, "decode_on_device", lambda cfg: True)
    cfg = tiny_jpeg_run(
        jpeg_shards,
        tmp_path,
        "train.log_every_steps=1",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
    )
    with caplog.at_level(logging.INFO, logger="selfsup.data"):
        summary = fit(cfg)
    assert "JPEGs decoded on the GPU by nvJPEG, other images in the loader workers (data.decode=auto)" in [
        r.getMessage() for r in caplog.records
    ]
    jpegs = rejected[0]  # every JPEG the device path met, one decode_jpeg call each
    assert jpegs > 0 and summary["data"]["decode_fallbacks"] == (jpegs + 1) // 2
    assert summary["data"]["decode_failed"] == 0
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [r["decode_fallbacks"] for r in records if "decode_fallbacks" in r]
    assert counts == sorted(counts) and counts[-1] == (jpegs + 1) // 2
    assert json.loads((cfg.run_dir / "summary.json").read_text())["data"]["decode_fallbacks"] == (jpegs + 1) // 2
