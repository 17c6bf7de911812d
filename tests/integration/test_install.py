"""selfsup as a user installs it: the wheel, in a fresh venv, run from a folder outside the checkout.

The fresh venv reuses the test venv's dependencies (a .pth line naming its site-packages, so nothing is
downloaded) but gets selfsup itself only from the wheel built here."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from selfsup.core.checkpoint import latest_checkpoint
from tests.helpers import write_tiny_shards

ROOT = Path(__file__).parents[2]


def run(*argv, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def constraints() -> dict[str, str]:
    pins = (
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {canonicalize_name(name): version for name, version in pins}


def test_the_tested_versions_are_pinned_and_within_the_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraints()
    assert "selfsup" not in pins
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        exact = ("import-linter", "ruff", "mypy")  # checkers: a new release changes what they report
        assert not str(req.specifier).startswith("==") or name in exact, f"{spec}: a range, not one version"
        assert pins[name] in req.specifier, f"constraints.txt pins {name}=={pins[name]}, outside {spec}"
        assert importlib.metadata.version(name) == pins[name], f"{name}: the venv is not what constraints.txt says"


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout's package (the build writes build/ and *.egg-info into its source)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "selfsup", src / "selfsup", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        src,
        "-w",
        tmp_path / "dist",
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("selfsup-*.whl")
    return wheel


def fresh_venv(path: Path, wheel: Path) -> Path:
    """A venv with the wheel installed and the test venv's packages (selfsup's editable install aside) visible."""
    run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    site = Path(
        run(
            path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=path.parent
        ).stdout.strip()
    )
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "test-venv-deps.pth").write_text("\n".join(deps) + "\n")  # plain paths: their .pth files (the editable
    # selfsup's finder among them) are not run
    run(
        path / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        "--disable-pip-version-check",
        wheel,
        cwd=path.parent,
    )
    return path / "bin"


@pytest.mark.integration
def test_the_wheel_installs_and_pretrains_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    assert "selfsup/configs/quickstart.yaml" in zipfile.ZipFile(wheel).namelist()
    bin_dir = fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "elsewhere"
    shards = write_tiny_shards(work / "shards", [24])

    where = run(bin_dir / "python", "-c", "import selfsup; print(selfsup.__file__)", cwd=work).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")  # the wheel's selfsup, not the checkout's
    listed = run(bin_dir / "selfsup", "configs", cwd=work).stdout
    assert re.search(r"^quickstart +The demo", listed, re.M) and "simclr-resnet50-imagenet" in listed
    assert str(tmp_path / "venv") in listed.splitlines()[-1]  # the configs come from the installed package

    # channels_last off: torch 2.11's CPU backward of a channels-last 1x1 stride-2 conv from 4 channels
    # (the width-4 ResNet's first shortcut) corrupts the heap on this machine
    done = run(
        bin_dir / "selfsup",
        "pretrain",
        "quickstart",
        "--no-ray",
        f"data.train={shards}",
        "data.test=null",
        "train.monitor_every_epochs=0",
        "name=x",
        "run_root=runs",
        "optim.epochs=1",
        "optim.minutes=null",
        "optim.warmup_epochs=0.2",
        "model.width=4",
        "train.channels_last=false",
        "method.proj_hidden_dim=32",
        "data.batch_size=8",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "train.threads=1",
        "train.log_every_steps=1",
        "tracking.mode=disabled",
        cwd=work,
        timeout=180,
    )
    assert re.search(r"^done: [1-9]\d* steps, final weights in ", done.stdout, re.M), done.stdout[-2000:]
    checkpoint = Path(re.search(r"final weights in (\S+?),", done.stdout).group(1))
    checkpoint = checkpoint if checkpoint.is_absolute() else work / checkpoint
    assert checkpoint.is_dir() and checkpoint.is_relative_to(work / "runs" / "x")
    assert checkpoint.resolve() == latest_checkpoint(work / "runs" / "x").resolve()  # the one written last
