"""benchmarks/methods_fmnist.py: learning curves from metrics.jsonl, baseline crossings, reuse/resume, the figure."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from benchmarks import methods_fmnist as bench
from tests.helpers import train_state, write_tiny_shards


def monitor_record(step, epoch, seconds, knn, rankme, **extra):
    return {
        "step": step,
        "samples": 16 * step,
        "epoch": epoch,
        "train_seconds": seconds,
        "monitor/knn@20": knn,
        "monitor/rankme": rankme,
        "monitor/random_init_knn@20": 0.30,
        "monitor/pixels_knn@20": 0.60,
        "monitor/collapse": 0.0,
        **extra,
    }


def training_record(step, epoch, seconds, loss):
    return {"step": step, "loss": loss, "rankme": 9.0, "epoch": epoch, "train_seconds": seconds, "samples_per_s": 50.0}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_curve_keeps_monitor_records_in_step_order_and_the_last_of_a_step_logged_twice(tmp_path):
    metrics = write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            training_record(5, 1.0, 30.0, 4.0),  # the epoch's last training record: the same step as its monitor record
            monitor_record(5, 1.0, 36.0, 0.40, 12.0),
            training_record(8, 1.6, 50.0, 3.5),
            monitor_record(10, 2.0, 72.0, 0.55, 14.0),  # an attempt interrupted after this record...
            monitor_record(10, 2.0, 90.0, 0.56, 15.0),  # ...and the resume that logged step 10 again
            monitor_record(15, 3.0, 120.0, 0.65, 16.0),
        ],
    )
    points, levels = bench.read_curve(metrics)
    assert points == [
        {"epoch": 1.0, "minutes": 0.6, "knn@20": 0.40, "rankme": 12.0},
        {"epoch": 2.0, "minutes": 1.5, "knn@20": 0.56, "rankme": 15.0},
        {"epoch": 3.0, "minutes": 2.0, "knn@20": 0.65, "rankme": 16.0},
    ]
    assert levels == {"random_init": 0.30, "pixels": 0.60}
    assert bench.read_curve(tmp_path / "missing.jsonl") == ([], {})


def test_crossings_are_the_first_point_strictly_above_each_level():
    points = [
        {"epoch": 1.0, "minutes": 2.0, "knn@20": 0.30},
        {"epoch": 2.0, "minutes": 4.5, "knn@20": 0.45},
        {"epoch": 3.0, "minutes": 7.0, "knn@20": 0.40},
        {"epoch": 4.0, "minutes": 9.5, "knn@20": 0.62},
    ]
    found = bench.crossings(points, {"random_init": 0.30, "pixels": 0.60, "supervised": 0.90})
    assert found == {
        "random_init": {"minute": 4.5, "epoch": 2.0},  # equal at epoch 1 is not above
        "pixels": {"minute": 9.5, "epoch": 4.0},
        "supervised": None,
    }
    assert bench.crossings([], {"pixels": 0.6}) == {"pixels": None}


def test_beats_compares_every_final_metric_with_every_baseline():
    scores = {"knn@20": 0.80, "knn@200": 0.70, "linear": 0.85}
    found = bench.beats(
        scores,
        {
            "pixels": {"knn@20": 0.82, "knn@200": 0.69, "linear": 0.85},
            "random_init": {"knn@20": 0.50, "knn@200": 0.40, "linear": 0.60},
        },
    )
    assert found == {
        "pixels": {"knn@20": False, "knn@200": True, "linear": False},
        "random_init": {"knn@20": True, "knn@200": True, "linear": True},
    }


def fake_checkpoint(run_dir, step):
    """A complete checkpoint as far as ``latest_checkpoint`` can tell: its progress.json lists its files."""
    ckpt = run_dir / "checkpoints" / f"samples-{8 * step:012d}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"abc")
    (ckpt / "progress.json").write_text(json.dumps({**train_state(step).progress().__dict__, "files": {"model.pt": 3}}))
    return ckpt


def test_plan_reuses_a_finished_result_resumes_an_interrupted_run_and_else_starts_afresh(tmp_path):
    wanted = {"minutes": 45.0, "recipe": "cpu", "overrides": [], "variant": ""}
    other = {**wanted, "minutes": 20.0}
    run = tmp_path / "simclr"
    assert bench.plan(None, wanted, run, restart=False) == ("fresh", None)  # nothing there yet
    assert bench.plan({"settings": wanted}, wanted, run, restart=False) == ("reuse", None)
    assert bench.plan({"settings": wanted}, wanted, run, restart=True) == ("fresh", None)
    ckpt = fake_checkpoint(run, 12)
    bench.settings_file(run).write_text(json.dumps(wanted))
    assert bench.plan(None, wanted, run, restart=False) == ("resume", ckpt)
    assert bench.plan({"settings": other}, wanted, run, restart=False) == ("resume", ckpt)  # a result of 20 min
    assert bench.plan(None, wanted, run, restart=True) == ("fresh", None)
    assert bench.plan(None, other, run, restart=False) == ("fresh", None)  # the run folder holds the 45-min run
    bench.settings_file(run).unlink()
    assert bench.plan(None, wanted, run, restart=False) == ("fresh", None)  # a run of unknown settings


def test_save_result_merges_entries_by_key_into_what_the_file_holds_now(tmp_path):
    path = tmp_path / "out" / "results.json"
    bench.save_result(path, "simclr", {"curve": [1]}, "cpu", {"pixels": {"knn@20": 0.8}})
    bench.save_result(path, "byol-lr0.2", {"curve": [2]}, "cpu", {})  # another invocation, baselines cached
    bench.save_result(path, "simclr", {"curve": [3]}, "gpu", {"pixels": {"knn@20": 0.7}})
    assert bench.read_results(path) == {
        "methods": {"simclr": {"curve": [3]}, "byol-lr0.2": {"curve": [2]}},
        "baselines": {"cpu": {"pixels": {"knn@20": 0.8}}, "gpu": {"pixels": {"knn@20": 0.7}}},
    }
    assert sorted(p.name for p in path.parent.iterdir()) == [".results.json.lock", "results.json"]  # no temporary file


def _save_entries(path: str, prefix: str, count: int) -> None:
    for i in range(count):
        bench.save_result(Path(path), f"{prefix}{i}", {"curve": [i]}, "cpu", {"pixels": {"knn@20": i}})


def test_invocations_that_save_at_the_same_time_lose_no_entry(tmp_path):
    path = tmp_path / "results.json"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_entries, args=(str(path), prefix, 60)) for prefix in "abc"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert set(bench.read_results(path)["methods"]) == {f"{p}{i}" for p in "abc" for i in range(60)}


def test_plot_curves_writes_a_png(tmp_path):
    curves = {
        "simclr": [{"epoch": 1.0, "minutes": 2.0, "knn@20": 0.5}, {"epoch": 2.0, "minutes": 4.0, "knn@20": 0.7}],
        "byol": [{"epoch": 1.0, "minutes": 2.5, "knn@20": 0.4}, {"epoch": 2.0, "minutes": 5.0, "knn@20": 0.75}],
    }
    out = tmp_path / "figs" / "curves.png"
    bench.plot_curves(curves, {"pixels": 0.6, "random_init": 0.3}, "ResNet-18, Fashion-MNIST, 4 min, 2 threads", out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_crossings_table_names_minute_and_epoch_or_never():
    entry = {
        "curve": [{"epoch": 1.0, "minutes": 2.0, "knn@20": 0.45}],
        "monitor_levels": {"random_init": 0.3, "pixels": 0.6},
        "crossings": {"random_init": {"minute": 2.0, "epoch": 1.0}, "pixels": None},
    }
    assert bench.crossings_table({"simclr": entry}) == (
        f"{'simclr':<18} crossed random init at minute 2.0 / epoch 1.00, never crossed pixels (60.00%); "
        "best online kNN@20 45.00%"
    )


TINY = [
    "data.batch_size=16",
    "data.loader_workers=0",
    "data.shuffle_buffer=0",
    "model.width=4",
    "method.proj_hidden_dim=16",
    "method.proj_dim=8",
    "optim.warmup_epochs=0",
    "train.threads=1",
    "train.precision=fp32",
    "train.channels_last=false",
    "train.log_every_steps=2",
    "eval.probe_views=1",
]


def test_a_tiny_benchmark_records_a_curve_per_epoch_then_reuses_and_resumes(tmp_path, capsys):
    write_tiny_shards(tmp_path / "data" / "train", [40, 40])
    write_tiny_shards(tmp_path / "data" / "test", [30], seed=1, split="test")
    argv = [
        "--minutes",
        "0",
        "--max-epochs",
        "2",
        "--methods",
        "simclr",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
        "--set",
        *TINY,
    ]
    results = tmp_path / "out" / "results.json"
    bench.main(argv)
    first = json.loads(results.read_text())
    entry = first["methods"]["simclr"]
    assert [p["epoch"] for p in entry["curve"]] == [1.0, 2.0]  # 80 samples / batch 16: 5 steps an epoch
    assert entry["curve"][0]["minutes"] < entry["curve"][1]["minutes"] <= entry["train"]["minutes"] + 0.01
    assert entry["train"]["steps"] == 10 and entry["settings"]["overrides"] == TINY
    assert ", 1 thread, " in entry["device"]  # the threads it trained with (train.threads), not the process's default
    assert set(entry["crossings"]) == set(entry["monitor_levels"]) == {"random_init", "pixels"}
    assert set(
        first["baselines"]["cpu data.batch_size=16 data.loader_workers=0 data.shuffle_buffer=0 model.width=4"]
    ) == {"pixels", "random_init"}  # keyed by the overrides that change the random-init network or the data
    assert set(entry["beats"]) == {"pixels", "random_init"}
    assert (tmp_path / "out" / "curves.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()

    bench.main(argv)  # finished: nothing trains again
    assert "simclr: already done, reusing results" in capsys.readouterr().out
    assert json.loads(results.read_text()) == first

    results.write_text(json.dumps({**first, "methods": {}}))  # as if interrupted before its evaluation
    bench.main(argv)
    printed = capsys.readouterr().out
    assert f"resuming simclr from {tmp_path / 'out' / 'simclr' / 'checkpoints'}" in printed and "(step 10)" in printed
    again = json.loads(results.read_text())["methods"]["simclr"]
    assert again["curve"] == entry["curve"] and again["train"]["steps"] == 10
    assert again["encoders"] == entry["encoders"]


def without_gpu_image_missing_packages(tmp_path, monkeypatch) -> None:
    """Processes started from here cannot import ray, wandb or faiss, as on the GPU machines' image."""
    blocker = tmp_path / "image"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules.update(ray=None, wandb=None, faiss=None)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))


def test_concurrent_methods_train_at_once_each_logged_and_merged_into_one_table(tmp_path, capsys, monkeypatch):
    without_gpu_image_missing_packages(tmp_path, monkeypatch)  # the benchmark needs none of them
    write_tiny_shards(tmp_path / "data" / "train", [40, 40])
    write_tiny_shards(tmp_path / "data" / "test", [30], seed=1, split="test")
    out = tmp_path / "out"
    argv = [
        "--minutes",
        "0",
        "--max-epochs",
        "1",
        "--methods",
        "simclr",
        "byol",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--concurrent",
        "--set",
        *TINY,
    ]
    bench.main(argv)
    printed = capsys.readouterr().out
    assert "training simclr, byol at once" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"simclr", "byol"}
    assert all(
        e["train"]["steps"] == 5 and [p["epoch"] for p in e["curve"]] == [1.0] for e in results["methods"].values()
    )  # 80 samples / batch 16, one epoch each
    for method in ("simclr", "byol"):
        assert f"{method} done; its log: {out / (method + '.log')}" in printed
        assert "wrote" in (out / f"{method}.log").read_text()  # each process printed its own table
        assert f"\n{method:<18} " in printed  # and the merged table has both
    results["methods"].pop("byol")  # as if byol was interrupted after its last checkpoint
    (out / "results.json").write_text(json.dumps(results))
    bench.main(argv)
    assert "simclr: already done, reusing results" in (out / "simclr.log").read_text()
    assert "resuming byol from" in (out / "byol.log").read_text()
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"simclr", "byol"}


def test_a_concurrent_method_that_fails_is_named_with_its_log(tmp_path, capsys, monkeypatch):
    write_tiny_shards(tmp_path / "data" / "train", [40])
    write_tiny_shards(tmp_path / "data" / "test", [30], seed=1, split="test")
    crash = tmp_path / "crash"
    crash.mkdir()  # every process the benchmark starts dies at once, as if killed
    (crash / "sitecustomize.py").write_text(
        "import os, sys\nif 'benchmarks.methods_fmnist' in sys.orig_argv:\n    print('killed'); os._exit(3)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(crash))
    out = tmp_path / "out"
    argv = [
        "--minutes",
        "0",
        "--max-epochs",
        "1",
        "--methods",
        "simclr",
        "moco_v2",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--concurrent",
        "--no-baselines",
        "--set",
        *TINY,
    ]
    with pytest.raises(SystemExit, match="simclr, moco_v2 did not finish; see .*<method>.log, and run the same"):
        bench.main(argv)
    printed = capsys.readouterr().out
    assert f"simclr failed (exit 3); its log: {out / 'simclr.log'}" in printed
    assert f"moco_v2 failed (exit 3); its log: {out / 'moco_v2.log'}" in printed
    assert (out / "moco_v2.log").read_text() == "killed\n"


def test_missing_shards_or_a_bad_override_stop_with_one_line_before_training(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as missing:
        bench.main(["--methods", "simclr", "--data", str(tmp_path / "none"), "--out", str(out), "--concurrent"])
    assert str(missing.value).startswith(
        f"--data {tmp_path / 'none'}: {tmp_path / 'none' / 'train'} has no "
        "manifest.json; for a folder of WebDataset tars run `selfsup shards index"
    )
    write_tiny_shards(tmp_path / "data" / "train", [40])
    write_tiny_shards(tmp_path / "data" / "test", [30], seed=1, split="test")
    with pytest.raises(SystemExit) as bad:  # BYOL has no temperature
        bench.main(
            [
                "--methods",
                "simclr",
                "byol",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(out),
                "--set",
                "method.temperature=0.5",
            ]
        )
    assert str(bad.value).startswith("byol: invalid config ") and "method.temperature: unknown key" in str(bad.value)
    assert "\n" not in str(bad.value) and not out.exists()  # nothing started
