"""Views cut from the whole original image, JPEG shards kept as JPEG (issue 13).

The ImageNet-like images come from ``selfsup.data.synthetic``; the GPU half skips without CUDA.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import decode_jpeg

from selfsup.cli import main
from selfsup.config import ViewRecipe, load_config
from selfsup.data import views as views_module
from selfsup.data.reader import read_manifest, read_shard
from selfsup.data.shards import image_sizes
from selfsup.data.synthetic import natural_image
from selfsup.data.views import BoxSampler, DeviceCrops, ViewItem, WholeImageViews, collate_views, cut_views
from selfsup.tasks.vision import VisionTask, image_decoding
from selfsup.vision.augment import BatchViews

IMAGENET = ((0.08, 1.0), (3 / 4, 4 / 3))  # RandomResizedCrop's scale and ratio
ORIENTATIONS = [(500, 375), (375, 500)]


def box_stats(boxes: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
    """Per box: area fraction, log aspect (w / h) and centre as a fraction of the image."""
    x1, y1, x2, y2 = boxes.double().unbind(1)
    w, h = x2 - x1, y2 - y1
    return {
        "area": w * h / (width * height),
        "log_aspect": torch.log(w / h),
        "cx": (x1 + x2) / (2 * width),
        "cy": (y1 + y2) / (2 * height),
        "area^2": (w * h / (width * height)) ** 2,
    }


def torchvision_boxes(n: int, width: int, height: int) -> torch.Tensor:
    image = torch.empty(3, height, width)
    out = []
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(image, list(IMAGENET[0]), list(IMAGENET[1]))
        out.append((j, i, j + w, i + h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("width, height", ORIENTATIONS)
def test_crop_boxes_match_torchvision_random_resized_crop(width, height):
    torch.manual_seed(0)
    n = 6000
    sampler = BoxSampler([IMAGENET])
    ours = box_stats(torch.stack([sampler(width, height)[0] for _ in range(n)]), width, height)
    theirs = box_stats(torchvision_boxes(n, width, height), width, height)
    for name in ours:
        a, b = ours[name], theirs[name]
        se = math.sqrt(a.var().item() / n + b.var().item() / n)
        assert abs(a.mean().item() - b.mean().item()) < 4 * se, f"{name}: {a.mean():.4f} vs {b.mean():.4f}, se {se:.4f}"
    for q in (0.1, 0.5, 0.9):  # the shape of the area distribution, not only its mean
        assert abs(ours["area"].quantile(q) - theirs["area"].quantile(q)) < 0.03


@pytest.mark.parametrize("width, height", ORIENTATIONS)
def test_over_many_draws_the_boxes_cover_the_whole_image_corners_included(width, height):
    torch.manual_seed(1)
    sampler = BoxSampler([IMAGENET, IMAGENET])
    boxes = torch.cat([sampler(width, height) for _ in range(12000)]).long()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    diff = torch.zeros(height + 1, width + 1)
    ones = torch.ones(len(boxes))
    x1, y1, x2, y2 = boxes.unbind(1)
    for ys, xs, sign in ((y1, x1, 1), (y1, x2, -1), (y2, x1, -1), (y2, x2, 1)):
        diff.index_put_((ys, xs), sign * ones, accumulate=True)
    covered = diff.cumsum(0).cumsum(1)[:height, :width]
    assert covered.min() > 0, "some pixels are never in any view"
    for y, x in ((0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)):
        assert covered[y, x] > 0
    # the outer eighth of each side is in a good share of the views (a centre crop first would leave it out)
    assert (x1 < width / 8).float().mean() > 0.2 and (x2 > width * 7 / 8).float().mean() > 0.2


def test_views_show_the_corners_of_a_jpeg():
    """Four corner patches of distinct colours all appear in some view cut by the CPU path."""
    img = np.full((375, 500, 3), 128, np.uint8)
    colours = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 0)}
    img[:48, :48], img[:48, -48:], img[-48:, :48], img[-48:, -48:] = colours.values()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    torch.manual_seed(2)
    decode = WholeImageViews([IMAGENET, IMAGENET], [64, 64], 3)
    crops = torch.cat([decode({"__key__": "k", "jpg": buf.getvalue(), "cls": b"0"}).crops[0] for _ in range(150)])
    pixels = crops.permute(0, 2, 3, 1).reshape(-1, 3).int()
    for name, colour in colours.items():
        near = (pixels - torch.tensor(colour)).abs().max(1).values < 40
        assert near.any(), f"the {name} corner is in no view"


def test_an_image_smaller_than_the_views_is_upsampled_on_both_paths():
    buf = io.BytesIO()
    Image.fromarray(natural_image(np.random.default_rng(5), 20, 16, 0, 2)).save(buf, format="JPEG", quality=90)
    sample = {"__key__": "tiny", "jpg": buf.getvalue(), "cls": b"1"}
    cut = WholeImageViews([IMAGENET, IMAGENET], [64, 64], 3)(sample)
    encoded = WholeImageViews([IMAGENET, IMAGENET], [64, 64], 3, on_device=True)(sample)
    (out,) = DeviceCrops([64, 64], 3, torch.device("cpu"))(collate_views([cut, encoded]))
    assert cut.crops[0].shape == (2, 3, 64, 64) and out.shape == (2, 2, 3, 64, 64)
    assert out.std() > 0.01  # image content, not an empty or constant crop


def test_one_size_images_give_the_same_views_on_the_fast_and_the_whole_image_paths():
    yy, xx = np.mgrid[0:28, 0:28]
    img = (xx * 6 + (yy > 14) * 80).clip(0, 255).astype(np.uint8)
    img[4:10, 18:26] = 255
    recipe, n = ViewRecipe(crop_scale=(0.08, 1.0), flip_p=0.0), 3000
    torch.manual_seed(3)
    fast = BatchViews([recipe], 28, [0.0], [1.0]).view(torch.from_numpy(img).expand(n, 1, 28, 28).contiguous(), recipe)
    sampler, pil = BoxSampler([(recipe.crop_scale, recipe.crop_ratio)]), Image.fromarray(img)
    whole = torch.stack([cut_views(pil, sampler(28, 28), [28], "L")[0][0] for _ in range(n)]).float() / 255
    a, b = fast[:, 0], whole[:, 0]
    z = (a.mean(0) - b.mean(0)) / torch.sqrt(a.var(0) / n + b.var(0) / n)
    assert z.abs().max() < 5 and (a.mean(0) - b.mean(0)).abs().mean() < 0.01
    assert abs(a.std(0).mean() - b.std(0).mean()) < 0.01


def shard_members(folder) -> dict[str, bytes]:
    """Every member of a shard folder's tars, by name."""
    manifest, urls = read_manifest(str(folder))
    out = {}
    for url in urls:
        with tarfile.open(url) as tf:
            out.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    return out


def test_jpeg_bytes_are_stored_unchanged_and_the_manifest_records_sizes(jpeg_folder, jpeg_shards):
    files = sorted(p for c in sorted(jpeg_folder.iterdir()) for p in sorted(c.iterdir()))
    members = shard_members(jpeg_shards)
    for i, path in enumerate(files):
        stored = members[f"img-{i:08d}.jpg"]
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest(), path
    manifest, _ = read_manifest(str(jpeg_shards))
    sizes = [tuple(s) for shard in manifest["shards"] for s in shard["sizes"]]
    assert sizes == [Image.open(p).size for p in files]
    assert image_sizes(manifest) == set(sizes) and len(set(sizes)) > 1


def test_max_side_reencodes_only_the_large_images_and_training_checks_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "a").mkdir(parents=True)
    for name, (w, h) in {"big": (500, 375), "small": (300, 200)}.items():
        Image.fromarray(natural_image(rng, w, h, 0, 2)).save(tmp_path / "in" / "a" / f"{name}.jpg", quality=90)
    write = ["shards", "write", "image-folder", str(tmp_path / "in")]
    assert main([*write, str(tmp_path / "out"), "--max-side", "400"]) == 0
    members = shard_members(tmp_path / "out")
    big, small = members["img-00000000.jpg"], members["img-00000001.jpg"]
    assert small == (tmp_path / "in" / "a" / "small.jpg").read_bytes()
    assert big != (tmp_path / "in" / "a" / "big.jpg").read_bytes() and Image.open(io.BytesIO(big)).size == (400, 300)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["max_side"] == 400 and manifest["shards"][0]["sizes"] == [[400, 300], [300, 200]]
    with pytest.raises(SystemExit, match="--max-side 16 is below 32"):
        main([*write, str(tmp_path / "o2"), "--max-side", "16"])
    cfg = load_config("simclr-resnet50-imagenet", [f"data.train={tmp_path / 'out'}", "data.image_size=448"])
    with pytest.raises(ValueError, match="data.image_size 448 is larger than the 400 px"):
        image_decoding(cfg, manifest)


def test_bad_images_are_decoded_or_skipped_counted_and_named(tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    good = io.BytesIO()
    Image.fromarray(natural_image(rng, 120, 90, 0, 2)).save(good, format="JPEG", quality=90)
    (folder / "good.jpg").write_bytes(good.getvalue())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    Image.fromarray(natural_image(rng, 64, 48, 1, 2)).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (1, 1)).save(folder / "pixel.png")
    assert main(["shards", "write", "image-folder", str(tmp_path / "in"), str(tmp_path / "out"), "--processes=1"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 3
    assert sorted(s.split(":")[0].rsplit("/", 1)[1] for s in manifest["skipped"]) == [
        "corrupt.jpg",
        "pixel.png",
        "truncated.jpg",
    ]
    assert sorted(s.split(":")[0].rsplit("/", 1)[1] for s in manifest["converted"]) == ["cmyk.jpg", "deep.png"]
    printed = capsys.readouterr().out
    assert "3 converted" not in printed and "2 converted, 3 unreadable skipped" in printed and "1x1 px" in printed
    members = shard_members(tmp_path / "out")
    # keys follow the sorted file names: cmyk.jpg, corrupt.jpg, deep.png, ...
    assert Image.open(io.BytesIO(members["img-00000000.jpg"])).mode == "RGB"
    deep = np.asarray(Image.open(io.BytesIO(members["img-00000002.png"])))
    assert deep.dtype == np.uint8 and (deep == 40000 >> 8).all()


def test_a_bad_sample_in_the_stream_raises_a_value_error_naming_it(jpeg_shards):
    _, urls = read_manifest(str(jpeg_shards))
    sample = next(iter(read_shard(urls[0], [])))
    sample["jpg"] = sample["jpg"][:2000]
    for on_device in (False, True):  # on_device: the worker only reads the header, the device path decodes
        decode = WholeImageViews([IMAGENET], [32], 3, on_device=on_device)
        if on_device:
            assert decode(sample).jpeg is not None
        else:
            with pytest.raises(ValueError, match=f"sample {sample['__key__']}: undecodable"):
                decode(sample)


def raw_samples(folder) -> list[dict]:
    _, urls = read_manifest(str(folder))
    return [s for url in urls for s in read_shard(url, [])]


def both_paths(samples: list[dict], size: int, seed: int) -> tuple[list, list]:
    """The worker's crops and the device reader's encoded views of ``samples``, drawn with the same boxes
    (the same seed: the same draws of the same sampler)."""
    torch.manual_seed(seed)
    worker = WholeImageViews([IMAGENET, IMAGENET], [size, size], 3)
    cut = [worker(s) for s in samples]
    torch.manual_seed(seed)
    reader = WholeImageViews([IMAGENET, IMAGENET], [size, size], 3, on_device=True)
    return cut, [reader(s) for s in samples]


def test_the_device_path_on_the_cpu_matches_the_worker_crops_on_the_same_boxes(jpeg_shards):
    """``DeviceCrops`` (decode_jpeg + roi_align, here on the CPU) against PIL's cut of the same boxes."""
    samples = raw_samples(jpeg_shards)
    cut, encoded = both_paths(samples, 64, seed=4)
    assert all(e.jpeg is not None for e in encoded)
    (on_device,) = DeviceCrops([64, 64], 3, torch.device("cpu"))(collate_views(encoded))
    (in_workers,) = DeviceCrops([64, 64], 3, torch.device("cpu"))(collate_views(cut))
    assert on_device.shape == in_workers.shape == (2, len(samples), 3, 64, 64)
    diff = (on_device - in_workers).abs().mean(dim=(2, 3, 4)) * 255
    assert diff.mean() < 3 and diff.max() < 6, diff


def test_a_jpeg_the_device_rejects_falls_back_to_the_cpu_and_junk_turns_grey(jpeg_shards, monkeypatch):
    samples = raw_samples(jpeg_shards)[:3]
    reader = WholeImageViews([IMAGENET], [32], 3, on_device=True)
    encoded = [reader(s) for s in samples]
    junk = ViewItem(
        0,
        "junk",
        jpeg=torch.frombuffer(bytearray(b"\xff\xd8 junk"), dtype=torch.uint8),
        boxes=torch.tensor([[0.0, 0.0, 40.0, 30.0]]),
    )
    batch = collate_views(encoded + [junk])
    (reference,) = DeviceCrops([32], 3, torch.device("cpu"))(collate_views(encoded))
    real, rejected = views_module.decode_jpeg, samples[1]["jpg"]

    def picky(data, **kw):  # the device decoder refuses the second JPEG, as nvJPEG might a CMYK one
        if isinstance(data, list) or data.numpy().tobytes() == rejected:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(views_module, "decode_jpeg", picky)
    crops = DeviceCrops([32], 3, torch.device("cpu"))
    (out,) = crops(batch)
    assert crops.health.decode_fallbacks == 1 and crops.health.decode_failed == 1 and out.shape == (1, 4, 3, 32, 32)
    assert (out[:, :3] - reference).abs().mean() < 2 / 255
    assert torch.allclose(out[:, 3], torch.full_like(out[:, 3], 128 / 255))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cpu_and_gpu_paths_agree_on_boxes_and_pixels(jpeg_shards):
    samples = raw_samples(jpeg_shards)
    cut, encoded = both_paths(samples, 96, seed=5)
    assert torch.equal(collate_views(encoded)["boxes"][:, 0], torch.stack([e.boxes[0] for e in encoded]))
    crops = DeviceCrops([96, 96], 3, torch.device("cuda"))
    gpu = crops(collate_views(encoded))[0].cpu()
    (cpu,) = DeviceCrops([96, 96], 3, torch.device("cpu"))(collate_views(cut))
    assert crops.health.decode_fallbacks == 0
    diff = (gpu - cpu).abs().mean(dim=(2, 3, 4)) * 255
    assert diff.mean() < 4 and diff.max() < 8, diff
    nv = decode_jpeg(torch.frombuffer(bytearray(samples[0]["jpg"]), dtype=torch.uint8), device="cuda").cpu()
    lib = decode_jpeg(torch.frombuffer(bytearray(samples[0]["jpg"]), dtype=torch.uint8))
    assert (nv.float() - lib.float()).abs().mean() < 2  # nvJPEG and libjpeg-turbo: decoder differences only


def test_the_vision_task_trains_on_views_from_jpegs_of_many_sizes(jpeg_shards):
    cfg = load_config(
        "simclr-resnet50-imagenet",
        [
            f"data.train={jpeg_shards}",
            "data.image_size=32",
            "data.batch_size=4",
            "data.loader_workers=0",
            "data.decode=cpu",
        ],
    )
    task = VisionTask()
    stream = task.train_stream(cfg)
    batch = next(iter(stream))
    assert [g.shape for g in batch["crops"]] == [(2, 4, 3, 32, 32)] and len(batch["jpeg_index"]) == 0
    views = task.input_fn(cfg, torch.device("cpu"))(batch)
    assert [v.shape for v in views] == [(4, 3, 32, 32)] * 2 and all(torch.isfinite(v).all() for v in views)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="data.decode=gpu needs a CUDA device"):
            task.train_stream(cfg.model_copy(update={"data": cfg.data.model_copy(update={"decode": "gpu"})}))
