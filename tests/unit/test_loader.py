import functools
from collections import Counter

import pytest
import torch

from selfsup.data.decode import collate_images, decode_image
from selfsup.data.stream import DataHealth, ShardStream, batches_before, make_loader, plan_epoch

decode = functools.partial(decode_image, channels=1, size=28)


def keyed_collate(items):
    return {"keys": [i for i in items]}


def decode_key(sample):
    if sample["png"][:4] != b"\x89PNG":
        raise ValueError(f"sample {sample['__key__']}: not a PNG")
    return sample["__key__"]


def epoch_keys(location, ranks, workers, batch, epoch=0, start_step=0):
    """{rank: [batch of keys, ...]} read through real DataLoaders with worker processes."""
    out = {}
    for r in range(ranks):
        s = ShardStream(
            str(location),
            batch,
            decode_key,
            lambda items: {"keys": items, "labels": torch.zeros(len(items))},
            rank=r,
            ranks=ranks,
            workers=workers,
            seed=3,
        )
        s.set_epoch(epoch, start_step)
        health = DataHealth()
        out[r] = []
        for b in make_loader(s, workers):
            health.add(b)
            out[r].append(b["keys"])
        out[r + 100] = health
    return out


def test_plan_gives_equal_whole_batches_and_covers_each_sample_once():
    counts = [30, 50, 10, 40, 25, 35, 60]  # 250 samples, 7 uneven shards
    plan = plan_epoch(counts, ranks=2, workers=3, batch_size=8, seed=0, epoch=0)
    assert plan.steps == (250 // 8) // 2 == 15
    assert [sum(q) for q in plan.quotas] == [15, 15]
    assert plan.quotas[0] == [5, 5, 5]
    seen = Counter()
    for r in range(2):
        for w in range(3):
            n = sum(p.stop - p.start for p in plan.ranges[r][w])
            assert n == plan.quotas[r][w] * 8
            for p in plan.ranges[r][w]:
                seen.update((p.shard, i) for i in range(p.start, p.stop))
    assert max(seen.values()) == 1
    assert sum(seen.values()) == 240  # 250 - 10 left over, fewer than (ranks + 1) * batch


def test_plan_shuffles_shard_order_per_epoch_but_agrees_across_ranks():
    counts = [10] * 12
    a, b = plan_epoch(counts, 2, 2, 4, seed=1, epoch=0), plan_epoch(counts, 2, 2, 4, seed=1, epoch=1)
    assert a.order != b.order
    assert a.order == plan_epoch(counts, 2, 2, 4, seed=1, epoch=0).order


def test_uneven_shards_over_2_ranks_x_3_workers_read_through_dataloaders(tiny_shards):
    got = epoch_keys(tiny_shards, ranks=2, workers=3, batch=8)
    assert len(got[0]) == len(got[1]) == 15
    keys = [k for r in (0, 1) for b in got[r] for k in b]
    assert all(len(b) == 8 for r in (0, 1) for b in got[r])
    assert len(keys) == len(set(keys)) == 240
    assert got[100].skipped == got[101].skipped == 0


def test_a_rank_with_no_full_shard_still_takes_the_same_steps(tmp_path):
    from tests.helpers import write_tiny_shards

    loc = write_tiny_shards(tmp_path / "s", [70, 3])  # one big shard, one nearly empty
    got = epoch_keys(loc, ranks=2, workers=2, batch=4)
    assert len(got[0]) == len(got[1]) == (73 // 4) // 2


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(tiny_shards):
    full = epoch_keys(tiny_shards, ranks=1, workers=3, batch=8)[0]
    rest = epoch_keys(tiny_shards, ranks=1, workers=3, batch=8, start_step=7)[0]
    assert rest == full[7:]


def test_batches_before_follows_round_robin_with_uneven_quotas():
    assert batches_before([3, 1, 2], 0) == ([0, 0, 0], 0)
    assert batches_before([3, 1, 2], 4) == ([2, 1, 1], 1)  # worker 1 is due but spent: the loader skips it
    assert batches_before([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert batches_before([3, 1, 2], 6) == ([3, 1, 2], 1)


def test_corrupt_sample_and_truncated_shard_are_skipped_counted_and_topped_up(tmp_path):
    from tests.helpers import write_tiny_shards

    loc = write_tiny_shards(tmp_path / "s", [40, 40])
    shard0 = sorted(loc.glob("*.tar"))[0]
    data = bytearray(shard0.read_bytes())
    first_png = data.find(b"\x89PNG")
    data[first_png : first_png + 4] = b"JUNK"  # one undecodable image
    shard0.write_bytes(bytes(data))
    shard1 = sorted(loc.glob("*.tar"))[1]
    whole = shard1.read_bytes()
    shard1.write_bytes(whole[: whole.find(b"\x89PNG", len(whole) // 2) + 50])  # truncated inside an image
    got = epoch_keys(loc, ranks=1, workers=1, batch=8)
    health = got[100]
    assert len(got[0]) == 10  # the planned steps, whatever was lost
    assert health.skipped >= 1 + 15
    assert health.repeated == sum(len(b) for b in got[0]) - (80 - health.skipped)
    assert any("not a PNG" in w for w in health.where)
    assert any("unreadable" in w for w in health.where)


def test_image_batches_are_uint8_with_labels(tiny_shards):
    s = ShardStream(str(tiny_shards), 16, decode, collate_images, workers=1)
    batch = next(iter(make_loader(s, 0)))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (16, 1, 28, 28)
    assert batch["labels"].dtype == torch.int64 and set(batch["labels"].tolist()) <= {0, 1, 2, 3}


def test_too_few_samples_for_one_batch_per_rank_is_refused(tiny_shards):
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardStream(str(tiny_shards), 200, decode, collate_images, ranks=2)


def stream_health(location, ranks, batch, **kw) -> list[tuple[int, DataHealth]]:
    """[(batches, DataHealth)] of each rank's epoch, read in this process (shard order unshuffled)."""
    out = []
    for r in range(ranks):
        s = ShardStream(str(location), batch, decode_key, keyed_collate, rank=r, ranks=ranks, shuffle=False, **kw)
        health, n = DataHealth(), 0
        for b in s:
            health.add(b)
            n += 1
        out.append((n, health))
    return out


def test_a_flipped_header_byte_counts_the_rest_of_the_shard_as_skipped(tmp_path):
    from tests.helpers import write_tiny_shards
    from tests.unit.test_shards import break_header

    loc = write_tiny_shards(tmp_path / "s", [1000])
    shard = f"{loc}/train0-000000.tar"
    break_header(loc / "train0-000000.tar", "s000500")
    # 4 ranks x 25 batches of 10: ranks 2 and 3 hold samples 500..749 and 750..999, all lost
    got = stream_health(loc, ranks=4, batch=10)
    assert [n for n, _ in got] == [25] * 4  # every rank still takes its planned steps
    assert [h.skipped for _, h in got] == [0, 0, 250, 250]
    assert [h.repeated for _, h in got] == [0, 0, 250, 250]  # topped up from samples 0..499
    line = (
        f"{shard}: the tar ends after sample 500, the manifest says 1000 (a corrupt header or a truncated file); "
        "250 samples lost"
    )
    assert [h.where for _, h in got] == [[], [], [line], [line]]
    total = DataHealth.merge([h for _, h in got])
    assert (total.skipped, total.repeated, total.mismatched) == (500, 500, 0)
    assert total.summary() == f"500 bad samples skipped, 500 samples repeated to top up batches; first: {line}; {line}"
    assert DataHealth.merge([h for _, h in got[:2]]).summary() == ""
    # one rank: the 500 lost samples of its range, once
    [(n, health)] = stream_health(loc, ranks=1, batch=10)
    assert (n, health.skipped, health.repeated) == (100, 500, 500)
    assert health.where == [line.replace("250 samples lost", "500 samples lost")]


def test_checksums_are_checked_when_asked_and_only_for_shards_read_whole(tmp_path):
    from tests.helpers import write_tiny_shards

    loc = write_tiny_shards(tmp_path / "s", [40, 40])
    shard1 = loc / "train1-000000.tar"
    data = bytearray(shard1.read_bytes())
    data[data.find(b"\x89PNG") + 100] ^= 0xFF  # a changed byte inside an image: still readable
    shard1.write_bytes(bytes(data))
    # 1 rank x 10 batches of 8: both shards read whole, from their first sample
    [(n, off)] = stream_health(loc, ranks=1, batch=8)
    [(_, on)] = stream_health(loc, ranks=1, batch=8, verify_checksums=True)
    assert n == 10 and (off.skipped, off.mismatched, off.where) == (0, 0, [])
    assert (on.skipped, on.repeated, on.mismatched) == (0, 0, 1)
    assert on.where == [
        f"{shard1}: sha256 differs from the manifest (shard changed or corrupt); run `selfsup shards verify {loc}`"
    ]
    assert "1 shards with a wrong sha256" in on.summary()
    # 2 ranks x 2 batches of 16: rank 0 reads samples 0..31 of shard 0, rank 1 32..39 of shard 0 and
    # 0..23 of shard 1: no shard is read whole, so none is hashed
    assert [h.mismatched for _, h in stream_health(loc, ranks=2, batch=16, verify_checksums=True)] == [0, 0]
