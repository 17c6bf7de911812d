"""Images: a vision method around a torchvision backbone, trained on batched random views."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.config import ExperimentConfig, ImageMethodConfig, ViewRecipe
from selfsup.core.cache import digest, load_cached, store_cached
from selfsup.core.device import memory_format, module_memory_format
from selfsup.core.distributed import rank, world_size
from selfsup.core.objective import Objective
from selfsup.core.progress import progress
from selfsup.data.decode import collate_images, decode_image, decode_native
from selfsup.data.preflight import max_side_problem
from selfsup.data.reader import read_manifest, read_split, split_identity
from selfsup.data.shards import image_sizes
from selfsup.data.stream import DataHealth, ShardStream
from selfsup.data.views import DeviceCrops, DeviceDecodeError, WholeImageViews, collate_views, nvjpeg_problem
from selfsup.methods import build_method
from selfsup.tasks import EvalSpec, LabelledSplit
from selfsup.vision.augment import BatchViews
from selfsup.vision.backbones import build_backbone, export_state_dict

log = logging.getLogger("selfsup.data")

DECODED_CACHE_BYTES = 2**30  # the largest decoded split (uint8 images) the evaluation caches


def backbone_of(cfg: ExperimentConfig) -> tuple[nn.Module, int]:
    """``cfg``'s backbone at random initialisation, and its feature dimension."""
    m = cfg.model
    return build_backbone(
        m.backbone, m.width, cfg.data.channels, m.small_stem, cfg.data.image_size, m.stem_stride, m.freeze_patch_embed
    )


def backbone_shape(cfg: ExperimentConfig) -> nn.Module:
    """``cfg``'s backbone on the meta device: its layers without their weights' memory (for ``memory_format``)."""
    with torch.device("meta"):
        return backbone_of(cfg)[0]


def views_for(cfg: ExperimentConfig) -> BatchViews:
    """The method's training views of ``cfg``: its recipes at ``data.image_size``, normalised by
    ``data.mean``/``std``."""
    return BatchViews(cfg.view_recipes(), cfg.data.image_size, cfg.data.mean, cfg.data.std)


def paper_crop_scale(image_size: int) -> tuple[float, float]:
    """The paper probe's random-resized-crop scale: ImageNet's (0.08, 1), or (0.7, 1) for images of
    32 px or less (about the area CIFAR's 4-pixel pad-and-crop keeps)."""
    return (0.7, 1.0) if image_size <= 32 else (0.08, 1.0)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    views: BatchViews,
    batch_size: int = 256,
    desc: str | None = "features",
    augment: bool = False,
) -> np.ndarray:
    """Features on the encoder's device: uint8 (N, C, H, W) -> float32 (N, D), un-augmented, or
    through ``views``' first recipe with ``augment``; a progress bar named ``desc`` (None: none).

    The inputs take the encoder's memory format; the encoder keeps its own (the online monitor scores
    the live training encoder, whose fused optimiser needs its parameters' strides unchanged)."""
    device = next(encoder.parameters()).device
    layout = module_memory_format(encoder)
    encoder.eval()
    out = []
    for i in progress(
        range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0, disable=desc is None, leave=False
    ):
        batch = images[i : i + batch_size].to(device)
        x = (views(batch)[0] if augment else views.plain(batch)).contiguous(memory_format=layout)
        out.append(encoder(x).float().cpu())
    return torch.cat(out).numpy()


def probe_features(
    encoder: nn.Module,
    images: torch.Tensor,
    views: BatchViews,
    n_views: int,
    seed: int = 0,
    desc: str | None = "features",
) -> np.ndarray:
    """The linear probe's train rows: uint8 (N, C, H, W) -> float32 (n_views·N, D), the un-augmented
    features, then ``n_views`` - 1 passes of the paper probe's random-resized crops and flips
    (``paper_crop_scale``), block by block as ``linear_probe(train_views=n_views)`` reads them."""
    blocks = [extract_features(encoder, images, views, desc=desc)]
    if n_views > 1:
        device = next(encoder.parameters()).device
        crops = BatchViews(
            [ViewRecipe(crop_scale=paper_crop_scale(views.size), flip_p=0.5)],
            views.size,
            views.mean.flatten().tolist(),
            views.std.flatten().tolist(),
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        blocks += [
            extract_features(encoder, images, crops, desc=desc and f"{desc}, view {v + 1}/{n_views}", augment=True)
            for v in range(1, n_views)
        ]
    return np.concatenate(blocks)


def decode_on_device(cfg: ExperimentConfig) -> bool:
    """Whether JPEGs are decoded on the GPU (``data.decode``; auto: when training on CUDA and this
    torchvision's nvJPEG decodes there, else in the loader workers, with one warning)."""
    cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    if cfg.data.decode == "gpu" and not cuda:
        raise ValueError(
            "data.decode=gpu needs a CUDA device (scaling.use_gpu=true and a GPU); set data.decode=cpu or auto"
        )
    if cfg.data.decode == "cpu" or not cuda:
        return False
    problem = nvjpeg_problem(torch.device("cuda", torch.cuda.current_device()))
    if problem is None:
        return True
    if cfg.data.decode == "gpu":
        raise DeviceDecodeError(
            f"data.decode=gpu: this torchvision cannot decode JPEGs on the GPU ({problem}); "
            "set data.decode=cpu, or install a torchvision built with nvJPEG"
        )
    log.warning(
        "data.decode=auto: this torchvision cannot decode JPEGs on the GPU (%s); they are decoded in "
        "the loader workers (set data.decode=cpu to say so)",
        problem,
    )
    return False


def image_decoding(cfg: ExperimentConfig, manifest: dict) -> tuple[Callable[[dict], Any], Callable[[list], dict]]:
    """(decode, collate) for the training shards of ``manifest``: images of one size are batched at that
    size and their views cut on the training device (``BatchViews``); images of many sizes have each
    view cut from the whole image per sample (``selfsup.data.views``), in the loader workers or, with
    ``decode_on_device``, on the GPU. Shards written with ``--max-side`` below ``data.image_size`` are refused."""
    d = cfg.data
    if problem := max_side_problem(manifest, d.image_size, d.train):
        raise ValueError(problem)
    sizes = image_sizes(manifest)
    if sizes is None:
        log.warning(
            "%s: the manifest records no image sizes (shards written by an older selfsup): views are cut "
            "from each image resized and centre-cropped to data.image_size; re-write the shards",
            d.train,
        )
        return functools.partial(
            decode_image, channels=d.channels, size=d.image_size, max_pixels=d.max_image_pixels
        ), collate_images
    if len(sizes) == 1:
        ((width, height),) = sizes
        return functools.partial(
            decode_native, channels=d.channels, width=width, height=height, max_pixels=d.max_image_pixels
        ), collate_images
    crops = [(r.crop_scale, r.crop_ratio) for r in cfg.view_recipes()]
    on_device = decode_on_device(cfg)
    if rank() == 0:
        log.info(
            "JPEGs decoded %s (data.decode=%s)",
            "on the GPU by nvJPEG, other images in the loader workers" if on_device else "by PIL in the loader workers",
            d.decode,
        )
    views = WholeImageViews(crops, cfg.view_sizes(), d.channels, on_device, d.max_image_pixels)
    return views, collate_views


def _flat_pixels(images: torch.Tensor) -> np.ndarray:
    """The raw-pixel baseline: uint8 (N, C, H, W) -> float32 (N, C·H·W) in [0, 1]."""
    return images.reshape(len(images), -1).float().div(255).numpy()


class VisionTask:
    unit = "img"

    def build_objective(self, cfg: ExperimentConfig) -> Objective:
        """The image method of ``cfg`` around its backbone, at random initialisation."""
        backbone, dim = backbone_of(cfg)
        if not isinstance(cfg.method, ImageMethodConfig):  # the config refuses another method with images
            raise TypeError(f"the image task trains an image method, not {cfg.method.name!r}")
        return build_method(cfg.method, backbone, dim)

    def train_stream(self, cfg: ExperimentConfig) -> ShardStream:
        """This rank's batches: {"images": uint8 (B, C, H, W), "labels": (B,)} for images of one size,
        else the views' crops cut from each whole image (``selfsup.data.views.collate_views``)."""
        decode, collate = image_decoding(cfg, read_manifest(cfg.data.train)[0])
        return ShardStream(
            cfg.data.train,
            cfg.data.batch_size,
            decode,
            collate,
            rank=rank(),
            ranks=world_size(),
            workers=max(1, cfg.data.loader_workers),
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            verify_checksums=cfg.data.verify_checksums,
        )

    def input_fn(
        self, cfg: ExperimentConfig, device: torch.device, health: DataHealth | None = None
    ) -> Callable[[dict], list[torch.Tensor]]:
        """batch -> the views [(B, C, S, S)] on ``device``, in the configured memory format: cut from a
        batch of one image size here, or from crops cut per image (in the workers, or here from JPEGs,
        counting those the device cannot decode in ``health``). The global views (S = ``data.image_size``)
        come first, then the local views by size."""
        views = views_for(cfg)
        layout = memory_format(device, cfg.train.channels_last, backbone_shape(cfg))
        crops = DeviceCrops(cfg.view_sizes(), cfg.data.channels, device, health)

        def to_input(batch: dict) -> list[torch.Tensor]:
            if "images" in batch:
                out = views(batch["images"].to(device, non_blocking=True))
            else:
                out = views.cropped(crops(batch))
            return [v.contiguous(memory_format=layout) for v in out]

        return to_input

    def read_labelled(self, location: str, cfg: ExperimentConfig, limit: int | None = None) -> LabelledSplit:
        """uint8 (N, C, S, S) images at ``data.channels`` and ``data.image_size`` (also the thumbnails).
        A whole split of at most ``DECODED_CACHE_BYTES`` is decoded once: later reads of the same
        shards at the same size load it from the cache, with the bad samples the first read found."""
        channels, size = cfg.data.channels, cfg.data.image_size
        listing = read_manifest(location)
        identity = split_identity(location, listing)
        key = None if limit else digest("decoded images", identity, channels, size, cfg.data.max_image_pixels)
        cached = load_cached("decoded", key) if key else None
        if cached is not None:
            log.info("%s: %d decoded images from the cache", location, len(cached["labels"]))
            images, labels, classes, problems = (
                cached["images"],
                cached["labels"],
                cached["classes"],
                cached["problems"],
            )
        else:
            decode = functools.partial(decode_image, channels=channels, size=size, max_pixels=cfg.data.max_image_pixels)
            items, manifest, problems = read_split(location, decode, limit, listing)
            images, labels = torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
            classes = manifest.get("classes", [])
            if key and images.numel() <= DECODED_CACHE_BYTES:
                store_cached(
                    "decoded", key, {"images": images, "labels": labels, "classes": classes, "problems": problems}
                )
        return LabelledSplit(
            location, images, labels.numpy(), classes, problems, [""] * len(labels), identity, thumbnails=images
        )

    def eval_features(
        self, encoder: nn.Module, split: LabelledSplit, cfg: ExperimentConfig, desc: str | None, probe_views: int = 1
    ) -> list[np.ndarray]:
        """[(V·N, D)]: the un-augmented features, then V - 1 passes of the paper probe's crops and flips."""
        return [probe_features(encoder, split.inputs, views_for(cfg), probe_views, desc=desc)]

    def baselines(self, train: LabelledSplit, test: LabelledSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Raw pixels in [0, 1]."""
        return {"pixels": (_flat_pixels(train.inputs), _flat_pixels(test.inputs))}

    def eval_spec(self, cfg: ExperimentConfig) -> EvalSpec:
        views = cfg.eval.probe_views
        rows = (
            "trained on each train image un-augmented"
            if views == 1
            else f"{views} views per train image (un-augmented, then {views - 1} of crops and flips)"
        )
        return EvalSpec(
            title=f"selfsup evaluation: {cfg.name} ({cfg.method.name}, {cfg.model.backbone} w{cfg.model.width})",
            unit="samples",
            diagnostics=True,
            probe_note=f"{rows}; "
            "lr={lr:g}, weight_decay={weight_decay:g} chosen on held-out train images "
            "(top-1 {top1:.2f}%); per-class scores, ROC and confusion are its predictions",
        )

    def input_spec(self, cfg: ExperimentConfig) -> dict:
        """float (B, ``channels``, ``image_size``, ``image_size``) in [0, 1], then (x - ``mean``) / ``std`` per
        channel."""
        d = cfg.data
        return {"mean": list(d.mean), "std": list(d.std), "image_size": d.image_size, "channels": d.channels}

    def export(self, objective: Objective, cfg: ExperimentConfig, out: Path) -> str:
        """The backbone under torchvision's key names with its geometry and input, ``torch.save``d
        (``selfsup.vision.backbones.torchvision_model`` builds and loads it)."""
        m = cfg.model
        export = export_state_dict(
            objective.encoder,
            m.backbone,
            width=m.width,
            small_stem=m.small_stem,
            stem_stride=m.stem_stride,
            **self.input_spec(cfg),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(export, out)
        head = "heads" if m.backbone.startswith("vit") else "fc"
        loads = (
            f"torchvision.models.{export['torchvision']}() with .{head} = nn.Identity() loads its state_dict strictly"
            if export["torchvision"]
            else "selfsup.vision.backbones.torchvision_model(file) builds it"
        )
        return (
            f"wrote the {m.backbone} encoder (weights, geometry and input; format {export['format']}) to {out}: {loads}"
        )
