"""Multi-crop views (DINO's global and local crops): the boxes of each crop size drawn as torchvision's
RandomResizedCrop draws them, from the whole image, cut at their own size on both decode paths, and
carried grouped by size."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from selfsup.config import ViewRecipe, expand_copies, preset_views
from selfsup.data.synthetic import natural_image
from selfsup.data.views import BoxSampler, DeviceCrops, WholeImageViews, collate_views, cut_views, size_groups
from selfsup.vision.augment import BatchViews

RATIO = (3 / 4, 4 / 3)
GLOBAL, LOCAL = (0.4, 1.0), (0.05, 0.4)  # DINO's scales
DINO_CROPS = [(GLOBAL, RATIO)] * 2 + [(LOCAL, RATIO)] * 8
DINO_SIZES = [64, 64] + [24] * 8  # the 224 / 96 of ImageNet, scaled to keep the test fast


def area_and_aspect(boxes: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
    x1, y1, x2, y2 = boxes.double().unbind(-1)
    w, h = x2 - x1, y2 - y1
    return {"area": (w * h / (width * height)).flatten(), "log_aspect": torch.log(w / h).flatten()}


def torchvision_boxes(n: int, width: int, height: int, scale: tuple[float, float]) -> torch.Tensor:
    image = torch.empty(3, height, width)
    out = []
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(image, list(scale), list(RATIO))
        out.append((j, i, j + w, i + h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("width, height", [(500, 375), (300, 420)])
def test_each_crop_sizes_boxes_match_random_resized_crop_with_its_scale(width, height):
    torch.manual_seed(0)
    n = 4000
    sampler = BoxSampler(DINO_CROPS)
    boxes = torch.stack([sampler(width, height) for _ in range(n)])  # (n, 10, 4)
    for scale, views in ((GLOBAL, slice(0, 2)), (LOCAL, slice(2, 10))):
        ours = area_and_aspect(boxes[:, views], width, height)
        theirs = area_and_aspect(torchvision_boxes(n, width, height, scale), width, height)
        for name in ours:
            a, b = ours[name], theirs[name]
            se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
            assert abs(a.mean().item() - b.mean().item()) < 4 * se, (
                f"{scale} {name}: {a.mean():.4f} vs {b.mean():.4f}, se {se:.4f}"
            )
            assert abs(a.std().item() - b.std().item()) < 0.1 * b.std().item(), f"{scale} {name} spread"
        lo, hi = ours["area"].min().item(), ours["area"].max().item()
        assert lo >= scale[0] - 0.01 and hi <= scale[1] + 0.01  # each size keeps to its own scale range
    local = boxes[:, 2:].reshape(-1, 4)  # drawn from the whole image: they reach every edge
    assert local[:, 0].min() == 0 and local[:, 1].min() == 0
    assert local[:, 2].max() == width and local[:, 3].max() == height


def test_views_are_grouped_by_size():
    assert size_groups(DINO_SIZES) == [(64, slice(0, 2)), (24, slice(2, 10))]
    assert size_groups([28, 28]) == [(28, slice(0, 2))]
    dino = expand_copies(preset_views("dino"))
    assert [r.size for r in dino] == [None, None] + [96] * 8 and len({id(r) for r in dino}) == 10
    assert [r.crop_scale for r in dino] == [GLOBAL] * 2 + [LOCAL] * 8
    assert [r.blur_p for r in dino] == [1.0, 0.1] + [0.5] * 8 and [r.solarize_p for r in dino[:2]] == [0.0, 0.2]


def jpeg_sample(key: str, seed: int, width: int = 200, height: int = 150) -> dict:
    buf = io.BytesIO()
    image = natural_image(np.random.default_rng(seed), width, height, 0, 3)
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return {"__key__": key, "jpg": buf.getvalue(), "cls": b"0"}


def test_both_decode_paths_cut_each_view_at_its_size_from_the_same_boxes():
    samples = [jpeg_sample(f"s{i}", i) for i in range(3)]
    torch.manual_seed(4)
    cut = [WholeImageViews(DINO_CROPS, DINO_SIZES, 3)(s) for s in samples]
    torch.manual_seed(4)
    encoded = [WholeImageViews(DINO_CROPS, DINO_SIZES, 3, on_device=True)(s) for s in samples]
    assert [g.shape for g in cut[0].crops] == [(2, 3, 64, 64), (8, 3, 24, 24)]
    batch = collate_views(cut)
    assert [g.shape for g in batch["crops"]] == [(2, 3, 3, 64, 64), (8, 3, 3, 24, 24)]
    in_workers = DeviceCrops(DINO_SIZES, 3, torch.device("cpu"))(batch)
    on_device = DeviceCrops(DINO_SIZES, 3, torch.device("cpu"))(collate_views(encoded))
    mixed = DeviceCrops(DINO_SIZES, 3, torch.device("cpu"))(collate_views([encoded[0], cut[1], encoded[2]]))
    for w, d, m in zip(in_workers, on_device, mixed):
        assert w.shape == d.shape == m.shape
        diff = (w - d).abs().mean(dim=(2, 3, 4)) * 255  # PIL's cut against decode_jpeg + roi_align
        assert diff.mean() < 4 and diff.max() < 8, diff
        torch.testing.assert_close(m[:, 1], w[:, 1])  # the worker-cut sample lands in its place
        torch.testing.assert_close(m[:, [0, 2]], d[:, [0, 2]])
    views = BatchViews(
        expand_copies([ViewRecipe(), ViewRecipe(), ViewRecipe(size=24, copies=8)]), 64, [0.5] * 3, [0.25] * 3
    ).cropped(in_workers)
    assert [tuple(v.shape) for v in views] == [(3, 3, 64, 64)] * 2 + [(3, 3, 24, 24)] * 8


def test_a_box_cut_from_a_jpeg_is_decoded_large_enough_for_its_own_size():
    """PIL's draft picks the DCT scale from each box's side over its own size: a small local box of a
    large image at 24 px must not be cut from an image shrunk for the 64 px global view's big box."""
    sample = jpeg_sample("big", 7, 800, 600)
    boxes = torch.tensor([[0.0, 0.0, 800.0, 600.0], [100.0, 100.0, 148.0, 148.0]])
    img = Image.open(io.BytesIO(sample["jpg"]))
    big, small = cut_views(img, boxes, [64, 24], "RGB")
    reference = (
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((24, 24), Image.BILINEAR, box=(100, 100, 148, 148))
    )
    ref = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float()
    assert big.shape == (1, 3, 64, 64) and small.shape == (1, 3, 24, 24)
    assert (small[0].float() - ref).abs().mean() < 6


def test_one_size_images_give_local_views_at_their_size():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    views = BatchViews(
        expand_copies([ViewRecipe(), ViewRecipe(), ViewRecipe(size=12, copies=3, blur_p=1.0)]), 28, [0.5], [0.25]
    )(images)
    assert [tuple(v.shape) for v in views] == [(5, 1, 28, 28)] * 2 + [(5, 1, 12, 12)] * 3


def test_the_vision_task_gives_dino_its_global_views_then_its_local_views():
    from selfsup.config import load_config
    from selfsup.tasks.vision import VisionTask

    cfg = load_config("dino-resnet18-fmnist-cpu")
    batch = {"images": torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8), "labels": torch.zeros(3)}
    views = VisionTask().input_fn(cfg, torch.device("cpu"))(batch)
    assert [tuple(v.shape) for v in views] == [(3, 1, 28, 28)] * 2 + [(3, 1, 12, 12)] * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_and_the_workers_cut_each_size_group_alike():
    samples = [jpeg_sample(f"s{i}", i) for i in range(4)]
    torch.manual_seed(6)
    cut = [WholeImageViews(DINO_CROPS, DINO_SIZES, 3)(s) for s in samples]
    torch.manual_seed(6)
    encoded = [WholeImageViews(DINO_CROPS, DINO_SIZES, 3, on_device=True)(s) for s in samples]
    crops = DeviceCrops(DINO_SIZES, 3, torch.device("cuda"))
    gpu = crops(collate_views(encoded))
    cpu = DeviceCrops(DINO_SIZES, 3, torch.device("cpu"))(collate_views(cut))
    assert crops.fallbacks == 0 and [g.shape for g in gpu] == [g.shape for g in cpu]
    for g, c in zip(gpu, cpu):
        diff = (g.cpu() - c).abs().mean(dim=(2, 3, 4)) * 255
        assert diff.mean() < 4 and diff.max() < 8, diff
