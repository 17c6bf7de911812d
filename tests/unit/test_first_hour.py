"""A new user's first hour: data refused before anything starts, conversions said once, each case one
``selfsup: error:`` or ``selfsup: note:`` line (in-process, no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup import cli
from selfsup.core.checkpoint import checkpoint_name
from tests.helpers import tiny_config, write_config, write_tiny_shards


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_error(capsys, argv: list[str], said: str) -> str:
    """The one stderr line of ``selfsup ARGV``, which ends with code 2; it starts with ``selfsup: error: {said}``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    said_lines = [line for line in lines(out.err + out.out) if line.startswith(("selfsup:", "warning:", "error:"))]
    assert len(said_lines) == 1 and "Traceback" not in out.err + out.out, out.err
    assert said_lines[0].startswith(f"selfsup: error: {said}"), out.err
    assert "\r" not in out.err and "\x1b" not in out.err  # off a terminal: no redraws, no escape codes
    return said_lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Neither Ray nor the loop may start: a test fails if either is reached."""
    from selfsup.cluster import in_process, ray_driver

    monkeypatch.setattr(ray_driver, "init_ray", lambda *a, **k: pytest.fail("Ray started before the data was checked"))
    monkeypatch.setattr(in_process, "train_here", lambda *a, **k: pytest.fail("training started"))


@pytest.mark.parametrize("ray", [False, True])
def test_fewer_samples_than_one_batch_is_one_line_before_ray(tmp_path, capsys, no_training, ray):
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [5]), tmp_path / "runs")
    )
    line = one_error(
        capsys,
        ["pretrain", str(config), *(["--no-ray"] if not ray else [])],
        f"data.train={tmp_path / 's'} holds 5 samples, fewer than one batch of 8",
    )
    assert line.endswith("set data.batch_size=5 or less, or add samples")
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()


def test_a_global_batch_of_several_workers_names_both_keys(tmp_path, capsys, no_training):
    config = write_config(
        tmp_path / "x.yaml",
        tiny_config("x", write_tiny_shards(tmp_path / "s", [20]), tmp_path / "runs", scaling={"num_workers": 3}),
    )
    line = one_error(capsys, ["pretrain", str(config)], f"data.train={tmp_path / 's'} holds 20 samples")
    assert "fewer than one batch of 8 per rank x 3 ranks (scaling.num_workers): set data.batch_size=6 or less" in line


@pytest.mark.parametrize(
    "case, said",
    [
        ("no train", "data.train={tmp}/nope does not exist; check the path"),
        (
            "no manifest",
            "data.train: {tmp}/tars has no manifest.json; for a folder of WebDataset tars run "
            "`selfsup shards index {tmp}/tars`",
        ),
        ("no test", "data.test={tmp}/nope does not exist"),
        ("empty", "data.train={tmp}/empty holds no samples; the first of its 1 skipped files: a.png: broken"),
    ],
)
def test_missing_or_empty_data_is_one_line_before_ray(tmp_path, capsys, no_training, case, said):
    shards = write_tiny_shards(tmp_path / "s", [16])
    (tmp_path / "tars").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"shards": [], "skipped": ["a.png: broken"]}))
    overrides = {
        "no train": [f"data.train={tmp_path / 'nope'}"],
        "no manifest": [f"data.train={tmp_path / 'tars'}"],
        "no test": [f"data.test={tmp_path / 'nope'}"],
        "empty": [f"data.train={tmp_path / 'empty'}"],
    }[case]
    config = write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs"))
    one_error(capsys, ["pretrain", str(config), *overrides], said.format(tmp=tmp_path))


def rgb_jpeg_shards(tmp_path: Path, n: int = 16, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(tmp_path / "photos" / c / f"{i}.jpg")
    assert cli.main(["shards", "write", "image-folder", str(tmp_path / "photos"), str(tmp_path / "shards")]) == 0
    return tmp_path / "shards"


def test_conversions_the_config_allows_are_each_one_note(tmp_path, capsys, monkeypatch):
    from selfsup.cluster import in_process

    shards = rgb_jpeg_shards(tmp_path)
    monkeypatch.setattr(
        in_process,
        "train_here",
        lambda cfg, *_, **__: {
            "steps": 2,
            "checkpoint": "c",
            "data": {"skipped": 0},
            "epochs": 1.0,
            "train_seconds": 6.0,
        },
    )
    capsys.readouterr()
    config = write_config(tmp_path / "x.yaml", tiny_config("x", shards, tmp_path / "runs"))  # grey, 28 px
    assert cli.main(["pretrain", str(config), "--no-ray", f"data.test={shards}"]) == 0
    notes = [line for line in lines(capsys.readouterr().err) if line.startswith("selfsup: note: ")]
    assert notes == [
        f"selfsup: note: data.train={shards} holds RGB images; each is converted to grey (data.channels=1)",
        f"selfsup: note: data.train={shards} holds 40x40 px images; views are cropped and resized to "
        "data.image_size=28",
        f"selfsup: note: data.test={shards} holds RGB images; each is converted to grey (data.channels=1)",
    ]
    assert (
        cli.main(
            [
                "pretrain",
                str(config),
                "--no-ray",
                "data.channels=3",
                "data.image_size=40",
                "data.mean=[0.5,0.5,0.5]",
                "data.std=[0.2,0.2,0.2]",
            ]
        )
        == 0
    )
    assert "note" not in capsys.readouterr().err


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the second checkpoint (--no-ray): one line, exit code 130; the command it names
    resumes from that checkpoint."""
    from selfsup.train.trainer import Trainer

    config = write_config(
        tmp_path / "x.yaml",
        tiny_config(
            "x", write_tiny_shards(tmp_path / "s", [40]), tmp_path / "runs", train={"checkpoint_every_steps": 2}
        ),
    )
    written, original = [], Trainer._checkpoint

    def checkpoint_then_ctrl_c(self, epoch, in_epoch):
        original(self, epoch, in_epoch)
        written.append(self.steps_done)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_then_ctrl_c)
    argv = ["pretrain", str(config), "--no-ray", "--restart"]
    capsys.readouterr()
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    (line,) = [line for line in lines(err) if line.startswith("selfsup: ")]
    assert "Traceback" not in err and line == (
        f"selfsup: error: interrupted; the last checkpoint is {tmp_path}/runs/x/checkpoints/{checkpoint_name(32)} "
        f"(step 4); resume with: selfsup pretrain {config} --no-ray"
    )
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    assert cli.main(argv[:3]) == 0
    out = capsys.readouterr()
    assert f"resumed x from {tmp_path}/runs/x/checkpoints/{checkpoint_name(32)} (step 4)" in out.err
    assert "done: 5 steps" in out.out


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    from selfsup.cluster import in_process

    def ctrl_c(cfg, *_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(in_process, "train_here", ctrl_c)
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [16]), tmp_path / "runs")
    )
    capsys.readouterr()
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 130
    assert lines(capsys.readouterr().err) == [
        f"selfsup: error: interrupted before the first checkpoint of "
        f"{tmp_path}/runs/x; `selfsup pretrain {config} --no-ray` starts it again"
    ]


@pytest.mark.parametrize("name", ["..", ".", "../x"])
def test_restart_with_an_unsafe_name_is_refused_and_moves_nothing(tmp_path, capsys, no_training, name):
    """A file beside runs/ and another run survive --restart of every name that is not one folder."""
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "beside-runs.txt").write_text("keep me")
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [16]), tmp_path / "runs")
    )
    one_error(
        capsys,
        ["pretrain", str(config), "--no-ray", "--restart", f"name={name}"],
        f"invalid config {config}: name: '{name}' is not a run name",
    )
    assert (tmp_path / "beside-runs.txt").read_text() == "keep me"
    assert (tmp_path / "runs" / "other" / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside-runs.txt", "runs", "s", "x.yaml"]


def test_set_aside_never_moves_what_is_outside_the_run_folder(tmp_path):
    """Even a config built without validation (``model_construct``) cannot make --restart move run_root's parent."""
    from selfsup.cluster.driver import RunFailed, set_aside
    from selfsup.config import parse_config

    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "beside-runs.txt").write_text("keep me")
    cfg = parse_config(tiny_config("x", tmp_path / "s", tmp_path / "runs"))
    for name in ("..", "."):
        with pytest.raises(RunFailed, match="--restart sets aside only a run folder inside run_root"):
            set_aside(cfg.model_copy(update={"name": name}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside-runs.txt", "runs"]
    kept = set_aside(cfg)
    assert kept == tmp_path / "runs" / kept.name and kept.name.startswith("x.old-")
    assert (kept / "metrics.jsonl").read_text() == "{}\n" and (tmp_path / "beside-runs.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside-runs.txt", "runs"]


def test_a_folder_of_no_readable_image_is_an_error_naming_it_and_its_first_bad_file(tmp_path, capsys):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "cat" / "a.jpg").write_text("not a jpeg")
    (tmp_path / "photos" / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    argv = ["shards", "write", "image-folder", str(tmp_path / "photos"), str(tmp_path / "out")]
    one_error(
        capsys,
        argv,
        f"image folder {tmp_path / 'photos'}: no sample could be written to {tmp_path / 'out'}; "
        f"the first of 2 skipped: {tmp_path / 'photos' / 'cat' / 'a.jpg'}: not a readable image "
        "(UnidentifiedImageError: cannot identify image file)",
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_each_skipped_file_is_named_with_the_decoders_reason(tmp_path, capsys):
    rgb_jpeg_shards(tmp_path, n=2)
    (tmp_path / "photos" / "a" / "bad.jpg").write_text("not a jpeg")
    capsys.readouterr()
    assert cli.main(["shards", "write", "image-folder", str(tmp_path / "photos"), str(tmp_path / "out")]) == 0
    skipped = [line for line in lines(capsys.readouterr().out) if "skipped:" in line]
    assert skipped == [
        f"  skipped: {tmp_path / 'photos' / 'a' / 'bad.jpg'}: not a readable image "
        "(UnidentifiedImageError: cannot identify image file)"
    ]


def test_eval_defaults_to_the_runs_data_and_never_overwrites_a_report(tmp_path, capsys):
    """Two test folders both named `test`: two reports; evaluating the same data again: a third, beside them."""
    train = write_tiny_shards(tmp_path / "train", [24])
    a, b = (
        write_tiny_shards(tmp_path / "a" / "test", [16], seed=1),
        write_tiny_shards(tmp_path / "b" / "test", [16], seed=2),
    )
    config = write_config(
        tmp_path / "x.yaml",
        tiny_config("x", train, tmp_path / "runs", data={"test": str(a)}, eval={"probe_views": 1, "knn": [[5, 0.1]]}),
    )
    run = tmp_path / "runs" / "x"
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    for argv in (
        [str(run), "--no-baselines"],
        [str(run), "--test", str(b), "--no-baselines"],
        [str(run), "--no-baselines"],
    ):
        assert cli.main(["eval", *argv]) == 0
    tested = {
        r.parent.name: json.loads(r.read_text())["notes"][1].split("test: ")[1].split(" (")[0]
        for r in run.glob("eval-*/report.json")
    }
    (again,) = [name for name in tested if name.endswith("-2")]
    first, other = again.removesuffix("-2"), next(n for n in tested if n not in (again, again.removesuffix("-2")))
    assert len(tested) == 3 and all(name.startswith("eval-test-") for name in tested)
    assert (tested[first], tested[again], tested[other]) == (str(a), str(a), str(b))
    assert "Traceback" not in capsys.readouterr().err


def test_eval_of_a_run_without_data_test_says_to_pass_test(tmp_path, capsys):
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [16]), tmp_path / "runs")
    )
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    one_error(
        capsys,
        ["eval", str(tmp_path / "runs" / "x")],
        "the run x was trained without data.test: pass --test DIR (labelled shards)",
    )


def test_eval_says_once_what_it_converts(tmp_path, capsys):
    """A grey checkpoint evaluated on RGB shards: a note for each split."""
    shards = rgb_jpeg_shards(tmp_path)
    config = write_config(
        tmp_path / "x.yaml",
        tiny_config(
            "x", write_tiny_shards(tmp_path / "s", [16]), tmp_path / "runs", eval={"probe_views": 1, "knn": [[5, 0.1]]}
        ),
    )
    assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    capsys.readouterr()
    assert (
        cli.main(
            ["eval", str(tmp_path / "runs" / "x"), "--train", str(shards), "--test", str(shards), "--no-baselines"]
        )
        == 0
    )
    notes = [line for line in lines(capsys.readouterr().err) if line.startswith("selfsup: note:")]
    assert notes == [
        f"selfsup: note: --{key}={shards} holds RGB images; each is converted to grey (data.channels=1)"
        for key in ("train", "test")
    ]


def test_rays_loggers_write_to_the_driver_log_not_the_console(tmp_path, capsys):
    """As ``ray.init(configure_logging=False)`` leaves them: Ray's loggers without handlers, not propagating.
    Their lines go to <run>/logs/driver.log, without terminal escape codes; selfsup's go to both."""
    import logging

    from selfsup.cluster.ray_driver import driver_log

    ray_logger = logging.getLogger("ray.test-driver-log")
    ray_logger.propagate = False
    cli.setup_logging(verbose=False)
    with driver_log(tmp_path / "run", verbose=False) as path:
        ray_logger.warning("Token authentication is enabled for this Ray cluster")
        ray_logger.warning(
            "Started a local Ray instance. View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m"
        )
        logging.getLogger("selfsup.cluster").info("Ray dashboard: http://127.0.0.1:8265")
    ray_logger.warning("after the run: logging's last resort again")
    err = capsys.readouterr().err
    assert lines(err) == ["Ray dashboard: http://127.0.0.1:8265", "after the run: logging's last resort again"]
    logged = [line.split(" ", 2)[2] for line in path.read_text().splitlines()]
    assert logged == [
        "WARNING ray.test-driver-log: Token authentication is enabled for this Ray cluster",
        "WARNING ray.test-driver-log: Started a local Ray instance. View the dashboard at http://127.0.0.1:8265",
        "INFO selfsup.cluster: Ray dashboard: http://127.0.0.1:8265",
    ]
    with driver_log(tmp_path / "run", verbose=True):  # -v: Ray's lines on the console too
        ray_logger.warning("Token authentication is enabled for this Ray cluster")
    assert lines(capsys.readouterr().err) == ["Token authentication is enabled for this Ray cluster"]


def test_a_workers_error_is_one_line_and_its_traceback_goes_to_the_driver_log(tmp_path):
    from selfsup.cluster.ray_driver import worker_failure

    class Wrapped(Exception):  # as Ray Train wraps a worker's exception: its str is the traceback
        def __init__(self, base):
            super().__init__("Traceback (most recent call last):\n  ...\nValueError: the shard is bad")
            self._base_exc = base

    class Failed(Exception):
        worker_failures = {1: Wrapped(ValueError("the shard is bad\nsecond line")), 0: Wrapped(KeyError("k"))}

    log = tmp_path / "driver.log"
    assert worker_failure(Failed("Training failed due to worker errors"), log) == (
        f"rank 0 failed: KeyError: 'k' (the traceback is in {log})"
    )
    assert "Traceback (most recent call last)" in log.read_text()


@pytest.mark.parametrize(
    "views, said",
    [
        (1, "linear probe (checkpoint): trained on each train image un-augmented; lr="),
        (3, "linear probe (checkpoint): 3 views per train image (un-augmented, then 2 of crops and flips); lr="),
    ],
)
def test_the_reports_probe_note_says_what_its_rows_are(views, said):
    from selfsup.config import parse_config
    from selfsup.tasks.vision import VisionTask

    spec = VisionTask().eval_spec(parse_config(tiny_config("x", "s", "runs", eval={"probe_views": views})))
    assert f"linear probe (checkpoint): {spec.probe_note}".startswith(said)


def test_a_finished_run_run_again_names_its_final_weights(tmp_path, capsys):
    config = write_config(
        tmp_path / "x.yaml", tiny_config("x", write_tiny_shards(tmp_path / "s", [16]), tmp_path / "runs")
    )
    for _ in range(2):
        capsys.readouterr()
        assert cli.main(["pretrain", str(config), "--no-ray"]) == 0
    (done,) = [line for line in lines(capsys.readouterr().out) if line.startswith("done: ")]
    assert done.startswith(
        f"done: 2 steps, final weights in {tmp_path}/runs/x/checkpoints/{checkpoint_name(16)}, 0 bad samples skipped"
    )


def test_an_undecodable_clip_is_named_with_the_decoders_reason(tmp_path, capsys):
    import soundfile as sf

    (tmp_path / "speech").mkdir()
    sf.write(tmp_path / "speech" / "good.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 8000), 16000)
    (tmp_path / "speech" / "bad.wav").write_text("not audio")
    capsys.readouterr()
    assert cli.main(["shards", "write", "audio-folder", str(tmp_path / "speech"), str(tmp_path / "out")]) == 0
    skipped = [line for line in lines(capsys.readouterr().out) if "skipped:" in line]
    assert skipped == [
        "  skipped: bad.wav: cannot decode audio (LibsndfileError: Error opening: Format not recognised.)"
    ]
