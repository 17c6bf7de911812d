"""The console of a run: one progress line a tenth of the run off a terminal, one line per online
check with the levels it must beat, and the driver following another process's metrics.jsonl."""

from __future__ import annotations

import io
import json
import threading
import time

from selfsup.train import console as console_module
from selfsup.train.console import ProgressConsole, follow_records


def step_record(step: int, total: int) -> dict:
    return {
        "step": step,
        "loss": 5.0 - step / 100,
        "epoch": step / 50,
        "epochs": total / 50,
        "total_steps": total,
        "samples_per_s": 300.0,
    }


def check_record(epoch: float, knn: float) -> dict:
    return {
        "epoch": epoch,
        "samples": int(epoch * 1000),
        "monitor/knn@20": knn,
        "monitor/rankme": 30.0,
        "monitor/random_init_knn@20": 0.672,
        "monitor/pixels_knn@20": 0.791,
    }


def test_off_a_terminal_the_progress_is_one_line_a_tenth_of_the_run():
    out = io.StringIO()
    sink = ProgressConsole("img", stream=out, live=False)
    for step in range(1, 101):
        sink.log(step, step_record(step, 100))
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the first step, then each tenth
    assert lines[-1] == "pretraining 100/100 steps (100%): epoch 2.00/2.00, loss 4.000, 300 img/s"


def test_an_online_check_prints_its_margin_and_the_levels_once():
    out = io.StringIO()
    sink = ProgressConsole("clip", stream=out, live=False)
    sink.log(10, check_record(1.0, 0.687))
    sink.log(20, check_record(2.0, 0.728))
    assert out.getvalue().splitlines() == [
        "online kNN@20 on a held-out subset must beat: random init 67.2%, pixels 79.1%",
        "epoch 1.00: online kNN@20 68.7% (+1.5 over random init), RankMe 30.0",
        "epoch 2.00: online kNN@20 72.8% (+5.6 over random init), RankMe 30.0",
    ]


def test_the_driver_follows_the_records_another_process_appends(tmp_path, monkeypatch):
    monkeypatch.setattr(console_module, "POLL_SECONDS", 0.01)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(check_record(1.0, 0.7)) + "\n")  # an earlier attempt's: not printed again
    seen = []

    class Recorder(ProgressConsole):
        def log(self, step, metrics):
            seen.append((step, "monitor/knn@20" in metrics))

    def worker():
        for step in range(1, 6):
            with open(path, "a") as f:
                f.write(json.dumps(step_record(step, 5)) + "\n")
            time.sleep(0.02)
        with open(path, "a") as f:
            f.write(json.dumps({"step": 5, **check_record(2.0, 0.75)}) + "\n")
            f.write('{"step": 6, "lo')  # half written: waits for its end

    with follow_records(path, Recorder("img", stream=io.StringIO(), live=False)):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, False), (5, True)]


def test_a_resumed_run_prints_none_of_the_earlier_attempts_lines_again(tmp_path, monkeypatch):
    """Off a terminal: the first attempt showed steps 1-6 of 10; the resume rewrites the records up to its
    checkpoint (step 4) and goes on. The console prints only the lines of steps 7-10."""
    monkeypatch.setattr(console_module, "POLL_SECONDS", 0.01)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({**step_record(s, 10), "samples": 8 * s}) + "\n" for s in range(1, 7)))
    out = io.StringIO()
    with follow_records(path, ProgressConsole("img", stream=out, live=False)):
        path.write_text("".join(json.dumps({**step_record(s, 10), "samples": 8 * s}) + "\n" for s in range(1, 5)))
        time.sleep(0.05)
        with open(path, "a") as f:
            f.writelines(json.dumps({**step_record(s, 10), "samples": 8 * s}) + "\n" for s in range(5, 11))
    assert [line.split(" steps")[0] for line in out.getvalue().splitlines()] == [
        "pretraining 7/10",
        "pretraining 8/10",
        "pretraining 9/10",
        "pretraining 10/10",
    ]


def test_off_a_terminal_a_progress_bar_is_a_line_a_tenth_never_a_redraw():
    from selfsup.core.progress import progress

    out = io.StringIO()
    for _ in progress(range(95), desc="shards", file=out, mininterval=0, miniters=1):
        pass
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert [line.split(" [")[0] for line in text.splitlines()] == [
        f"shards: {100 * n / 95:3.0f}% {n}/95" for n in (0, 10, 19, 29, 38, 48, 57, 67, 76, 86, 95)
    ]  # each tenth


def test_the_driver_logs_a_workers_selfsup_lines_once(tmp_path, monkeypatch, caplog):
    """Rank 0's records (its selfsup logger, through ``worker_log_handler``) are logged in the driver under
    their own logger and level; an earlier attempt's records in the file are not logged again."""
    import logging

    from selfsup.train.console import follow_worker_log, worker_log_handler

    monkeypatch.setattr(console_module, "POLL_SECONDS", 0.01)
    path = tmp_path / "logs" / "worker.jsonl"
    handler = worker_log_handler(path)  # the worker's, in another process there

    def worker(level, message, *args):
        handler.handle(logging.LogRecord("selfsup.pretrain", level, __file__, 0, message, args, None))

    worker(logging.WARNING, "an earlier attempt's line")
    with caplog.at_level(logging.INFO), follow_worker_log(path):
        worker(logging.INFO, "resumed from step %d", 4)
        worker(logging.WARNING, "epoch 1: 2 bad samples skipped")
        time.sleep(0.05)
    handler.close()
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("selfsup.pretrain", "INFO", "resumed from step 4"),
        ("selfsup.pretrain", "WARNING", "epoch 1: 2 bad samples skipped"),
    ]


def test_off_a_terminal_a_transient_bar_prints_nothing():
    from selfsup.core.progress import progress

    out = io.StringIO()
    for _ in progress(range(50), desc="features", file=out, leave=False, mininterval=0, miniters=1):
        pass
    assert out.getvalue() == ""
