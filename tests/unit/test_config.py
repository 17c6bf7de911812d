from pathlib import Path

import pytest

from selfsup.config import ConfigError, dump_config, load_config, parse_config

BASE = {"name": "t", "data": {"train": "x"}, "method": {"name": "simclr"}}
CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("overrides, key, words", [
    (["optim.lrr=1"], "optim.lrr", "unknown key"),
    (["method.temprature=0.1"], "method.temprature", "unknown key"),
    (["data.batch_size=0"], "data.batch_size", "greater than 0"),
    (["optim.name=adam"], "optim.name", "'sgd', 'lars' or 'adamw'"),
    (["augment.preset=rainbow"], "augment.preset", "unknown preset"),
    (["data.channels=3"], "data", "data.mean and data.std need 3 values"),
    (["name=has space"], "name", "pattern"),
])
def test_bad_keys_and_values_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, overrides)
    assert f"  {key}: " in str(err.value) and words in str(err.value)


def test_overrides_are_parsed_as_yaml_and_round_trip(tmp_path):
    cfg = parse_config(BASE, ["optim.lr=0.5", "train.threads=2", "eval.knn=[[10, 0.1]]"])
    assert cfg.optim.lr == 0.5 and cfg.train.threads == 2 and cfg.eval.knn == [(10, 0.1)]
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_override_without_equals_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_config(BASE, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_a_config_cannot_name_a_python_callable():
    with pytest.raises(ConfigError, match="method"):
        parse_config({**BASE, "method": {"name": "os.system"}})
    with pytest.raises(ConfigError):
        parse_config(BASE, ["model.backbone=!!python/name:os.system"])  # YAML tags are not data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_validates(path):
    load_config(path)
