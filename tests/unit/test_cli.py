"""The command line explains itself: help and an example everywhere, --version, configs by name,
`config show`, options anywhere among the overrides, skipped files printed (in-process, no subprocess)."""

import argparse
import json

import numpy as np
import pytest
import yaml

import selfsup
from selfsup import cli
from selfsup.config import BYOLConfig, config_description, load_config, parse_config, shipped_configs


def commands(parser: argparse.ArgumentParser, prefix: str = "selfsup"):
    """(name, parser) of every command that runs something, sub-commands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{prefix} {name}")
            return
    yield prefix, parser


@pytest.fixture
def pretrain_calls(monkeypatch):
    """Replaces the training itself: each `selfsup pretrain` records (cfg, no_ray, address)."""
    from selfsup.cluster import driver

    calls = []

    def pretrain(cfg, use_ray=True, address=None, restart=False):
        calls.append((cfg, not use_ray, address))
        return {"steps": 0, "checkpoint": None, "data": {"skipped": 0}, "epochs": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(driver, "pretrain", pretrain)
    return calls


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"selfsup {selfsup.__version__}"


def test_every_option_has_help_and_every_command_an_example():
    found = dict(commands(cli.build_parser()))
    assert {
        "selfsup pretrain",
        "selfsup shards write",
        "selfsup config show",
        "selfsup configs",
        "selfsup demo",
        "selfsup eval",
        "selfsup export",
        "selfsup submit",
        "selfsup jobs",
    } <= set(found)
    for name, parser in found.items():
        assert parser.epilog and f"\n  {name}" in parser.epilog, f"{name}: no example"
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"


def test_selfsup_configs_lists_each_shipped_config_with_its_description(capsys):
    assert cli.main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, path in shipped_configs().items():
        assert any(line.split()[0] == name and line.endswith(config_description(path)) for line in lines if line), name


def test_config_show_prints_the_resolved_config(capsys):
    assert cli.main(["config", "show", "quickstart", "optim.lr=0.5", "method.name=byol"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "quickstart.yaml optim.lr=0.5 method.name=byol" in out.splitlines()[0]
    cfg = parse_config(yaml.safe_load(out))  # the printed YAML is a config that loads as it is
    assert cfg == load_config("quickstart", ["optim.lr=0.5", "method.name=byol"])
    assert cfg.optim.lr == 0.5 and cfg.method == BYOLConfig() and cfg.model.width == 8


def test_config_show_of_a_bad_override_is_one_line(capsys):
    assert cli.main(["config", "show", "quickstart", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr: unknown key" in err and "Traceback" not in err


def test_a_shipped_config_runs_by_name_or_by_path(pretrain_calls):
    assert cli.main(["pretrain", "simclr-resnet50-imagenet"]) == 0
    assert cli.main(["pretrain", str(shipped_configs()["simclr-resnet50-imagenet"])]) == 0
    assert pretrain_calls[0][0] == pretrain_calls[1][0] == load_config("simclr-resnet50-imagenet")
    assert load_config(cli.build_parser().parse_args(["demo"]).config).name == "quickstart"  # the demo's default


def test_options_may_come_anywhere_among_the_overrides(pretrain_calls):
    argv = [
        "pretrain",
        "quickstart",
        "optim.lr=0.5",
        "--no-ray",
        "data.batch_size=8",
        "--address",
        "ray://h:1",
        "optim.lr=0.7",
    ]
    assert cli.main(argv) == 0
    cfg, no_ray, address = pretrain_calls[-1]
    assert no_ray and address == "ray://h:1"
    assert cfg.data.batch_size == 8 and cfg.optim.lr == 0.7  # in order: the later override wins
    assert (
        cli.main(["pretrain", "--no-ray", "quickstart", "optim.lr=0.5"]) == 0 and pretrain_calls[-1][0].optim.lr == 0.5
    )


@pytest.mark.parametrize(
    "argv, stray",
    [
        (["pretrain", "quickstart", "--no-rayy", "optim.lr=1"], "--no-rayy"),
        (["jobs", "status", "raysubmit_1", "extra"], "extra"),
    ],
)
def test_unknown_options_and_stray_words_are_still_refused(argv, stray, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_shards_write_prints_the_skipped_files(tmp_path, capsys):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / c / "good.png")
    for i in range(cli.SHOWN_SKIPPED + 3):
        (tmp_path / "imgs" / "dog" / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    # an option between the two paths: `paths` still gets both
    assert cli.main(["shards", "write", "image-folder", str(tmp_path / "imgs"), "--per-shard", "10", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert len(skipped) == cli.SHOWN_SKIPPED + 3
    assert [line for line in printed if line.startswith("  skipped: ")] == [f"  skipped: {s}" for s in skipped[:20]]
    assert printed[-1] == f'  ... and 3 more; all 23 are listed in {out / "manifest.json"} under "skipped"'
