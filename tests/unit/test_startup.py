"""The config and the command line start without the heavy libraries (each check in a fresh interpreter)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HEAVY = ("torch", "torchvision", "torchaudio", "ray", "wandb", "webdataset")


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_validating_every_shipped_config_imports_no_torch():
    code = (
        "import sys; from selfsup.config import load_config, shipped_configs\n"
        "for p in shipped_configs().values(): load_config(p).view_recipes()\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    done = python("-c", code)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["submit", "--help"], ["configs"], ["config", "show", "quickstart"]],
    ids=["help", "submit-help", "configs", "config-show"],
)
def test_help_imports_no_torch(argv):
    done = python("-X", "importtime", "-m", "selfsup.cli", *argv)
    assert done.returncode == 0, done.stderr
    assert "usage: selfsup" in done.stdout or "quickstart" in done.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "argparse" in imported  # the -X importtime listing is there to read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_shows_a_description_for_users():
    done = python("-m", "selfsup.cli", "--help")
    assert "Self-supervised pretraining" in done.stdout and "Nothing else lives here" not in done.stdout


def test_import_selfsup_imports_no_torch_until_the_library_api_is_used():
    code = (
        "import sys, selfsup\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert selfsup.__version__ and selfsup.load_encoder.__module__ == 'selfsup.eval.features'\n"
        "assert 'torch' in sys.modules"
    )
    done = python("-c", code)
    assert done.returncode == 0, done.stderr
