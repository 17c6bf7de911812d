"""View augmentations done on whole batches as tensor ops, each sample drawing its own parameters.

The same code runs on the CPU and on a GPU: decode to uint8 on the CPU, move the batch to the
training device, then call :class:`BatchViews`. The recipes (``selfsup.config.ViewRecipe`` and its
``PRESETS``) follow the papers (SimCLR, MoCo v2, BYOL) and have grey-image variants without colour
operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from selfsup.config import ViewRecipe


def _uniform(lo: float, hi: float, n: int, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device=None,
    generator=None,
    tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes as (B, 4) [x1, y1, x2, y2], drawn as torchvision draws them.

    Each sample tries ``tries`` (area, log-ratio) draws and keeps the first that fits; samples where
    none fits fall back to a centred crop of the whole image clamped to ``ratio``.
    """
    area = height * width
    target = area * _uniform(scale[0], scale[1], batch * tries, device, generator)
    log_r = _uniform(math.log(ratio[0]), math.log(ratio[1]), batch * tries, device, generator)
    r = torch.exp(log_r)
    w = torch.sqrt(target * r).round().view(batch, tries)
    h = torch.sqrt(target / r).round().view(batch, tries)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1, device=device))
    idx = first.clamp(min=0).unsqueeze(1)
    w = w.gather(1, idx).squeeze(1)
    h = h.gather(1, idx).squeeze(1)
    in_ratio = width / height
    fb_w = (
        float(width)
        if ratio[0] <= in_ratio <= ratio[1]
        else (round(height * ratio[0]) if in_ratio < ratio[0] else round(height * ratio[1]))
    )
    fb_h = (
        float(height)
        if ratio[0] <= in_ratio <= ratio[1]
        else (round(width / ratio[0]) if in_ratio < ratio[0] else round(width / ratio[1]))
    )
    fb_w, fb_h = min(fb_w, width), min(fb_h, height)
    fallback = first < 0
    w = torch.where(fallback, torch.full_like(w, fb_w), w)
    h = torch.where(fallback, torch.full_like(h, fb_h), h)
    x1 = torch.floor(torch.rand(batch, device=device, generator=generator) * (width - w + 1))
    y1 = torch.floor(torch.rand(batch, device=device, generator=generator) * (height - h + 1))
    x1 = torch.where(fallback, torch.div(width - w, 2, rounding_mode="floor"), x1)
    y1 = torch.where(fallback, torch.div(height - h, 2, rounding_mode="floor"), y1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box and resize bilinearly: (B, C, H, W), (B, 4) -> (B, C, size, size)."""
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype).unsqueeze(1), boxes], 1)
    return roi_align(
        images, rois.to(images.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True
    )


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma: (B, C, H, W), (B,) -> (B, C, H, W).

    Reflect padding, as torchvision's ``GaussianBlur``. A sigma of 0 leaves the sample unchanged.
    """
    b, c, h, w = images.shape
    half = kernel_size // 2
    xs = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    s = sigma.to(images.dtype).clamp(min=1e-6).unsqueeze(1)
    k = torch.exp(-0.5 * (xs.unsqueeze(0) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    k = k.repeat_interleave(c, 0)  # (B*C, K)
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.view(b, c, h, w)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV, (..., 3, H, W) -> (..., 3, H, W), hue in turns [0, 1), as PIL and
    torchvision convert (grey pixels get hue and saturation 0). torchvision has no public
    conversion, and its public ``adjust_hue`` takes one factor for the whole batch."""
    r, g, b = rgb.unbind(-3)
    maxc, minc = rgb.amax(-3), rgb.amin(-3)
    delta = maxc - minc
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)  # grey: 0 / 1 instead of 0 / 0
    saturation = delta / torch.where(grey, torch.ones_like(maxc), maxc)
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(grey, torch.zeros_like(hue), torch.remainder(hue / 6.0, 1.0))
    return torch.stack([hue, saturation, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (hue in turns) -> RGB, (..., 3, H, W) -> (..., 3, H, W): channel n in (r, g, b) is
    v * (1 - s * clamp(min(k, 4 - k), 0, 1)) with k = (n' + 6 h) mod 6 and n' = 5, 3, 1."""
    h, s, v = (c.unsqueeze(-3) for c in hsv.unbind(-3))
    # 5, 3, 1 made on the device (torch.tensor([5., 3., 1.]) would be a host-to-device copy each call)
    offsets = torch.arange(5.0, 0.0, -2.0, device=hsv.device, dtype=hsv.dtype).view(3, 1, 1)
    k = torch.remainder(offsets + 6.0 * h, 6.0)
    return v * (1.0 - s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def shift_hue(rgb: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each sample's hue rotated by its own ``shift`` (in turns, as torchvision's ``adjust_hue``
    factor): (B, 3, H, W) in [0, 1], (B,) -> (B, 3, H, W)."""
    hsv = rgb_to_hsv(rgb)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def color_jitter(x: torch.Tensor, recipe: ViewRecipe, apply: torch.Tensor, generator=None) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (in that order) with per-sample factors, on samples where ``apply``."""
    b, dev = x.shape[0], x.device
    out = x
    if recipe.brightness > 0:
        f = _uniform(max(0.0, 1 - recipe.brightness), 1 + recipe.brightness, b, dev, generator)
        out = (out * _per_sample(f)).clamp(0, 1)
    if recipe.contrast > 0:
        f = _per_sample(_uniform(max(0.0, 1 - recipe.contrast), 1 + recipe.contrast, b, dev, generator))
        mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
        out = (f * out + (1 - f) * mean).clamp(0, 1)
    if x.shape[1] == 3 and recipe.saturation > 0:
        f = _per_sample(_uniform(max(0.0, 1 - recipe.saturation), 1 + recipe.saturation, b, dev, generator))
        out = (f * out + (1 - f) * _grey(out)).clamp(0, 1)
    if x.shape[1] == 3 and recipe.hue > 0:
        out = shift_hue(out, _uniform(-recipe.hue, recipe.hue, b, dev, generator))
    return torch.where(_per_sample(apply), out, x)


class BatchViews:
    """Makes one augmented view per recipe from a uint8 batch, normalised for the encoder.

    ``__call__(images: uint8 (B, C, H, W)) -> list of float (B, C, S, S)``, one per recipe, S the
    recipe's ``size`` (a local crop) or ``size`` (a global crop).
    """

    def __init__(
        self,
        recipes: list[ViewRecipe],
        size: int,
        mean: list[float],
        std: list[float],
        generator: torch.Generator | None = None,
    ):
        self.recipes, self.size, self.generator = recipes, size, generator
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def view(self, images: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
        """One augmented, normalised view: uint8 (B, C, H, W) -> float (B, C, S, S)."""
        b, _, h, w = images.shape
        x = images.float().div_(255)
        boxes = crop_boxes(b, h, w, recipe.crop_scale, recipe.crop_ratio, images.device, self.generator)
        return self.augment(resized_crop(x, boxes, recipe.size or self.size).clamp_(0, 1), recipe)

    def cropped(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views of crops already cut per recipe (``selfsup.data.views``), grouped by size:
        [float (V_g, B, C, S_g, S_g)] in [0, 1] -> [float (B, C, S, S)] * V, augmented and normalised."""
        return [self.augment(x, r) for x, r in zip((x for g in groups for x in g), self.recipes, strict=True)]

    def augment(self, x: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
        """Everything after the crop (flip, jitter, grey, blur, solarize, each drawn per sample), then
        normalised: float (B, C, size, size) in [0, 1] -> float (B, C, size, size)."""
        g, dev = self.generator, x.device
        b = x.shape[0]
        if recipe.flip_p > 0:
            flip = torch.rand(b, device=dev, generator=g) < recipe.flip_p
            x = torch.where(_per_sample(flip), x.flip(-1), x)
        if recipe.jitter_p > 0:
            x = color_jitter(x, recipe, torch.rand(b, device=dev, generator=g) < recipe.jitter_p, g)
        if recipe.grayscale_p > 0 and x.shape[1] == 3:
            x = torch.where(_per_sample(torch.rand(b, device=dev, generator=g) < recipe.grayscale_p), _grey(x), x)
        if recipe.blur_p > 0:
            sigma = _uniform(*recipe.blur_sigma, b, dev, g)
            blurred = gaussian_blur(x, sigma, max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1))  # 10% of the side
            x = torch.where(_per_sample(torch.rand(b, device=dev, generator=g) < recipe.blur_p), blurred, x)
        if recipe.solarize_p > 0:
            sol = _per_sample(torch.rand(b, device=dev, generator=g) < recipe.solarize_p)
            x = torch.where(sol & (x >= 0.5), 1 - x, x)
        return self.normalise(x)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.view(images, r) for r in self.recipes]

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """No augmentation, for evaluation: uint8 (B, C, H, W) -> normalised float (B, C, H, W)."""
        x = images.float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel; the constants move to ``x``'s device once, not every batch
        (a host-to-device copy each step would make the GPU step wait for the host)."""
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std
