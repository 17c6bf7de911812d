"""BatchViews (the batched path that runs on a GPU) draws the same distribution as torchvision's per-image CPU path.

Statistics of many views of a fixed batch are compared with torchvision ``transforms.v2``
(RandomResizedCrop + RandomHorizontalFlip + GaussianBlur); tolerances are a few standard errors,
and each statistic moves well past its tolerance when the matching probability or range is changed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from selfsup.config import ViewRecipe, preset_views
from selfsup.vision.augment import BatchViews, crop_boxes, hsv_to_rgb, rgb_to_hsv, shift_hue

SIZE = 32
N = 512


def striped_ramps(n: int) -> torch.Tensor:
    """uint8 (n, 1, SIZE, SIZE): a left-to-right ramp (so a flip is visible) plus horizontal stripes (so blur is)."""
    w = torch.arange(SIZE).float() / (SIZE - 1)
    h = torch.arange(SIZE).float()
    base = 0.15 + 0.5 * w.view(1, SIZE) + 0.2 * torch.sin(2 * math.pi * h / 6).view(SIZE, 1)
    gain = torch.linspace(0.8, 1.2, 8).repeat(n // 8).view(-1, 1, 1)
    return ((base * gain).clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)


def view_stats(views: torch.Tensor) -> dict[str, float]:
    """Statistics of float views (N, 1, H, W) in [0, 1]."""
    means = views.mean(dim=(1, 2, 3))
    half = views.shape[-1] // 2
    flipped = views[..., :half].mean(dim=(1, 2, 3)) > views[..., half:].mean(dim=(1, 2, 3))
    return {
        "mean": means.mean().item(),
        "spread_of_means": means.std().item(),  # crop position and scale
        "std": views.std(dim=(1, 2, 3)).mean().item(),
        "row_roughness": (views[..., 1:, :] - views[..., :-1, :]).abs().mean().item(),  # falls with blur
        "flipped": flipped.float().mean().item(),
    }


def test_view_statistics_match_torchvision_per_image_pipeline():
    images = striped_ramps(N)
    recipe = ViewRecipe(crop_scale=(0.2, 1.0), flip_p=0.5, blur_p=0.5, blur_sigma=(0.1, 2.0))
    batch_views = BatchViews([recipe], SIZE, mean=[0.0], std=[1.0], generator=torch.Generator().manual_seed(0))
    ours = view_stats(batch_views(images)[0])

    torch.manual_seed(0)
    per_image = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomResizedCrop(SIZE, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.GaussianBlur(max(3, int(0.1 * SIZE) // 2 * 2 + 1), sigma=(0.1, 2.0))], p=0.5),
        ]
    )
    theirs = view_stats(torch.stack([per_image(img) for img in images]))

    assert ours["mean"] == pytest.approx(theirs["mean"], abs=0.01)
    assert ours["spread_of_means"] == pytest.approx(theirs["spread_of_means"], abs=0.006)
    assert ours["std"] == pytest.approx(theirs["std"], abs=0.004)
    assert ours["row_roughness"] == pytest.approx(theirs["row_roughness"], rel=0.02)
    assert ours["flipped"] == pytest.approx(theirs["flipped"], abs=0.08)
    assert ours["flipped"] == pytest.approx(0.5, abs=0.07)


def test_crop_areas_and_ratios_match_torchvision():
    n, scale, ratio = 4000, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = crop_boxes(n, SIZE, SIZE, scale, ratio, generator=torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= SIZE).all() and (boxes[:, 3] <= SIZE).all()

    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(SIZE, scale=scale, ratio=ratio)
    params = [crop.make_params([torch.zeros(1, SIZE, SIZE)]) for _ in range(n)]
    tv_w = torch.tensor([p["width"] for p in params], dtype=torch.float)
    tv_h = torch.tensor([p["height"] for p in params], dtype=torch.float)

    area, tv_area = w * h / SIZE**2, tv_w * tv_h / SIZE**2
    assert area.mean().item() == pytest.approx(tv_area.mean().item(), abs=0.015)  # standard error ~0.006
    assert area.std().item() == pytest.approx(tv_area.std().item(), abs=0.015)
    assert (w / h).log().mean().item() == pytest.approx((tv_w / tv_h).log().mean().item(), abs=0.02)


def test_identical_images_get_different_crops():
    image = torch.randint(0, 256, (1, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pair = image.expand(2, -1, -1, -1)
    recipe = ViewRecipe(flip_p=0.0)
    views = BatchViews([recipe], SIZE, mean=[0.0], std=[1.0], generator=torch.Generator().manual_seed(1))(pair)[0]
    assert not torch.allclose(views[0], views[1])
    boxes = crop_boxes(2, SIZE, SIZE, recipe.crop_scale, recipe.crop_ratio, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(boxes[0], boxes[1])


def test_byol_preset_is_asymmetric():
    first, second = preset_views("byol")
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)

    bright = torch.full((N, 1, SIZE, SIZE), 230, dtype=torch.uint8)  # 0.9: never below 0.5 after jitter
    view1, view2 = BatchViews([first, second], SIZE, mean=[0.0], std=[1.0], generator=torch.Generator().manual_seed(0))(
        bright
    )
    assert solarized_fraction(view1) == 0.0
    assert solarized_fraction(view2) == pytest.approx(0.2, abs=0.05)


def solarized_fraction(views: torch.Tensor) -> float:
    """Share of views (N, 1, H, W) of a bright constant image that came out dark, i.e. were solarized."""
    return (views.mean(dim=(1, 2, 3)) < 0.5).float().mean().item()


def colour_images(n: int) -> torch.Tensor:
    """float (n, 3, 16, 16) in [0, 1] on the uint8 grid, with grey pixels, black pixels and channel ties."""
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(0)).float() / 255
    x[0] = 0.5  # grey: hue and saturation 0
    x[1, :, :4] = 0.0  # black
    x[2, 1] = x[2, 0]  # red and green tie for the maximum in places
    return x


def test_rgb_hsv_round_trip():
    x = colour_images(8)
    hsv = rgb_to_hsv(x)
    assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 1 and (hsv[0, :2] == 0).all()
    torch.testing.assert_close(hsv_to_rgb(hsv), x, rtol=0, atol=1e-6)


def test_hue_shift_matches_torchvision_adjust_hue():
    x = colour_images(9)
    for factor in (-0.5, -0.1, 0.0, 0.23, 0.5):  # one image, one factor: torchvision's public adjust_hue
        want = TF.adjust_hue(x[3], factor)
        torch.testing.assert_close(shift_hue(x[3:4], torch.tensor([factor]))[0], want, rtol=0, atol=1e-5)
    shifts = torch.linspace(-0.5, 0.5, len(x))  # a batch, one factor per sample
    want = torch.stack([TF.adjust_hue(img, float(f)) for img, f in zip(x, shifts)])
    torch.testing.assert_close(shift_hue(x, shifts), want, rtol=0, atol=1e-5)
    assert not torch.allclose(shift_hue(x, shifts), x, atol=1e-2)
