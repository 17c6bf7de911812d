from pathlib import Path

import pytest

from selfsup.config import (
    METHOD_CONFIGS,
    BYOLConfig,
    ConfigError,
    MoCoV2Config,
    ViewRecipe,
    config_description,
    dump_config,
    find_config,
    load_config,
    mirror_dir,
    parse_config,
    preset_views,
    shipped_configs,
)

BASE = {"name": "t", "data": {"train": "x"}, "method": {"name": "simclr"}}
CONFIGS = sorted(shipped_configs().values())


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["optim.lrr=1"], "optim.lrr", "unknown key"),
        (["method.temprature=0.1"], "method.temprature", "unknown key"),
        (["data.batch_size=0"], "data.batch_size", "greater than 0"),
        (["optim.name=adam"], "optim.name", "'sgd', 'lars' or 'adamw'"),
        (["augment.preset=rainbow"], "augment.preset", "unknown preset"),
        (["data.channels=3"], "data", "data.mean and data.std need 3 values"),
        (["name=has space"], "name", "not a run name"),
        (["name=.."], "name", "'..' is not a run name: use one folder name"),
        (["name=."], "name", "not a run name"),
        (["name=a/b"], "name", "not a run name"),
        (["optim.decay=step"], "optim.decay", "'cosine' or 'linear'"),
        (["data.max_tokens=0"], "data.max_tokens", "greater than 0"),
        (["data.bucket_size=1"], "data.bucket_size", "greater than 1"),
        # every numeric field with a valid range is bounded
        (["method.temperature=0"], "method.temperature", "greater than 0"),
        (["method.proj_layers=0"], "method.proj_layers", "greater than or equal to 1"),
        (["seed=-1"], "seed", "greater than or equal to 0"),
        (["data.std=[0]"], "data.std.0", "greater than 0"),
        (["optim.betas=[0.9,1.0]"], "optim.betas.1", "less than 1"),
        (["eval.knn=[[0,0.1]]"], "eval.knn.0.0", "greater than 0"),
        (["eval.knn=[[20,0]]"], "eval.knn.0.1", "greater than 0"),
        (["augment.views=[{crop_scale: [0.5, 0.2]}, {}]"], "augment.views.0.crop_scale", "not a range"),
        (["augment.views=[{crop_scale: [0, 1]}, {}]"], "augment.views.0.crop_scale.0", "greater than 0"),
        (["augment.views=[{blur_sigma: [2, 0.1]}, {}]"], "augment.views.0.blur_sigma", "not a range"),
        (
            ["method.name=wav2vec2", "method.preset=tiny", "data.kind=audio", "method.conv_strides=[5,0]"],
            "method.conv_strides.1",
            "greater than 0",
        ),
    ],
)
def test_bad_keys_and_values_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, overrides)
    assert f": {key}: " in str(err.value) and words in str(err.value)
    assert "\n" not in str(err.value)  # one error, one line


@pytest.mark.parametrize("name", ["a\tb", "a\nb", "runs/x", "..", "", "x\x00"])
def test_a_run_name_is_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match="not a run name"):
        parse_config({**BASE, "name": name})


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["optim.lrr=1"], "optim.lrr: unknown key; did you mean optim.lr?"),
        (["method.temprature=0.1"], "method.temprature: unknown key; did you mean method.temperature?"),
        (["data.batchsize=8"], "data.batchsize: unknown key; did you mean data.batch_size?"),
        (["optim.zzz=1"], "optim.zzz: unknown key (check the spelling)"),
    ],
)
def test_an_unknown_key_suggests_the_close_match(overrides, said):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, overrides)
    assert str(err.value) == f"invalid config <dict>: {said}"


def test_several_errors_are_a_line_each():
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, ["optim.lrr=1", "data.batch_size=0"])
    assert str(err.value).splitlines()[0] == "invalid config <dict>:" and len(str(err.value).splitlines()) == 3


def test_overrides_are_parsed_as_yaml_and_round_trip(tmp_path):
    cfg = parse_config(BASE, ["optim.lr=0.5", "train.threads=2", "eval.knn=[[10, 0.1]]"])
    assert cfg.optim.lr == 0.5 and cfg.train.threads == 2 and cfg.eval.knn == [(10, 0.1)]
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_round_trips_through_its_dump(tmp_path, path):
    cfg = load_config(path)  # wav2vec2-*: a preset and a schedule in updates, written out in full
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


def test_each_method_config_declares_the_data_it_trains_on():
    assert all(cfg_cls().name == name for name, cfg_cls in METHOD_CONFIGS.items())
    assert parse_config({**BASE, "data": {"train": "x", "kind": "audio"}, "method": {"name": "wav2vec2"}})
    with pytest.raises(ConfigError, match="data.kind must be 'audio' for method 'wav2vec2', not 'image'"):
        parse_config({**BASE, "method": {"name": "wav2vec2", "preset": "tiny"}})
    with pytest.raises(ConfigError, match="data.kind must be 'image' for method 'simclr', not 'audio'"):
        parse_config(BASE, ["data.kind=audio"])


def test_a_bucket_run_works_in_its_local_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path))
    cfg = parse_config({**BASE, "run_root": "s3://bucket/runs/"})
    assert cfg.run_url == "s3://bucket/runs/t"
    assert cfg.run_dir == mirror_dir("s3://bucket/runs/", "t") == tmp_path / "runs" / "s3" / "bucket" / "runs" / "t"
    local = parse_config(BASE)
    assert local.run_url is None and local.run_dir == Path("runs") / "t"


def test_views_come_from_the_preset_unless_given():
    assert parse_config(BASE).view_recipes() == preset_views("grey")
    cfg = parse_config(BASE, ["augment.views=[{blur_p: 1.0}, {blur_p: 0.5, copies: 2}]"])
    assert cfg.view_recipes() == [ViewRecipe(blur_p=1.0), ViewRecipe(blur_p=0.5), ViewRecipe(blur_p=0.5)]
    with pytest.raises(ConfigError, match="method simclr needs 2 views at data.image_size 28, got 1"):
        parse_config(BASE, ["augment.views=[{blur_p: 1.0}]"])
    assert not parse_config(BASE).data.verify_checksums


def test_the_configs_ship_in_the_package_and_the_checkout_folder_is_the_same():
    assert len(CONFIGS) >= 20 and all(p.parent.name == "configs" and p.parent.parent.name == "selfsup" for p in CONFIGS)
    checkout = Path(__file__).parents[2] / "configs"
    assert sorted(p.name for p in checkout.glob("*.yaml")) == [p.name for p in CONFIGS]
    assert all(config_description(p) for p in CONFIGS), "each shipped config starts with a one-line comment"


def test_a_config_is_found_by_name_or_by_path(tmp_path, monkeypatch):
    shipped = shipped_configs()["simclr-resnet50-imagenet"]
    assert find_config("simclr-resnet50-imagenet") == find_config("simclr-resnet50-imagenet.yaml") == shipped
    assert load_config("simclr-resnet50-imagenet") == load_config(shipped)
    monkeypatch.chdir(tmp_path)  # outside the checkout: a file of that name in the folder wins over the shipped one
    (tmp_path / "quickstart.yaml").write_text(dump_config(parse_config(BASE)))
    assert find_config("quickstart.yaml") == Path("quickstart.yaml") and load_config("quickstart.yaml").name == "t"
    assert find_config("quickstart") == shipped_configs()["quickstart"]
    with pytest.raises(
        ConfigError, match="nope does not exist, nor is it the name of a shipped config.*selfsup configs"
    ):
        load_config("nope")
    with pytest.raises(ConfigError, match="configs/quickstart.yaml does not exist: give a YAML file"):
        load_config("configs/quickstart.yaml")  # a path is only a path


def test_method_name_override_switches_to_the_new_methods_defaults():
    cfg = load_config("quickstart", ["method.name=byol"])  # quickstart's simclr keys (temperature) are dropped
    assert cfg.method == BYOLConfig()
    cfg = load_config("quickstart", ["method.name=moco_v2", "method.queue_size=4096", "optim.lr=0.1"])
    assert cfg.method == MoCoV2Config(queue_size=4096) and cfg.optim.lr == 0.1
    same = load_config("quickstart", ["method.name=simclr"])  # naming the same method keeps its keys
    assert same.method == load_config("quickstart").method and same.method.proj_hidden_dim == 512
    with pytest.raises(ConfigError, match="method.temperature: unknown key"):
        load_config("quickstart", ["method.name=byol", "method.temperature=0.1"])
    with pytest.raises(ConfigError, match="data.kind must be 'audio' for method 'wav2vec2'"):
        load_config("quickstart", ["method.name=wav2vec2"])
    assert (
        load_config("quickstart", ["method.name=wav2vec2", "method.preset=tiny", "data.kind=audio"]).method.num_layers
        == 2
    )


def test_lr_decay_and_audio_batching_default_to_the_old_behaviour():
    cfg = parse_config(BASE)
    assert cfg.optim.decay == "cosine" and cfg.data.max_tokens is None
    assert parse_config(BASE, ["optim.decay=linear", "data.max_tokens=1400000"]).data.max_tokens == 1_400_000


def test_multi_crop_views_are_checked_against_the_global_size_and_the_method():
    local = "{size: 12, copies: 4, crop_scale: [0.05, 0.4]}"
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, ["augment.views=[{}, {}, {size: 32}]"])
    assert "view 2 has size 32, larger than data.image_size 28" in str(err.value)
    assert len(str(err.value).splitlines()) <= 2  # the header and one line
    with pytest.raises(ConfigError, match=r"views of sizes \[28, 12, 28\]: list the global views first"):
        parse_config(BASE, ["augment.views=[{}, {size: 12}, {}]"])
    with pytest.raises(ConfigError, match="method simsiam does not use local crops \\(4 views smaller"):
        parse_config(BASE, [f"augment.views=[{{}}, {{}}, {local}]", "method.name=simsiam"])
    assert len(parse_config(BASE, [f"augment.views=[{{}}, {{}}, {local}]"]).view_recipes()) == 6  # SimCLR: an option


@pytest.mark.parametrize(
    "name, absent",
    [
        ("wav2vec2-tiny", ["image_size", "channels", "mean", "std", "decode"]),
        ("quickstart", ["max_seconds", "min_seconds", "max_tokens", "bucket_size"]),
    ],
)
def test_a_dump_lists_no_key_of_the_other_kind_of_data_and_loads_back_the_same(name, absent, tmp_path):
    import yaml

    cfg = load_config(name)
    tree = yaml.safe_load(dump_config(cfg))
    assert [key for key in absent if key in tree["data"]] == []
    assert ("augment" in tree and "model" in tree) == (cfg.data.kind == "image")
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    changed = parse_config(
        yaml.safe_load(dump_config(cfg)), ["data.max_seconds=3.0"] if name == "quickstart" else ["data.image_size=32"]
    )
    assert load_config(tmp_path / "c.yaml") != changed  # a non-default value of the other kind is kept
    (tmp_path / "d.yaml").write_text(dump_config(changed))
    assert load_config(tmp_path / "d.yaml") == changed
