"""Config loading: inheritance, overrides, round trips and one-line errors for bad input."""
from pathlib import Path

import pytest

from albef.config import Config, ConfigError, check_paths, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_albef_4m():
    cfg = load_config(None)
    assert (cfg.model.vision.image_size, cfg.train.batch_size) == (256, 64)
    assert (cfg.model.embed_dim, cfg.model.temp, cfg.loss.mlm_probability) == (256, 0.07, 0.15)
    assert (cfg.model.queue_size, cfg.model.momentum, cfg.loss.alpha) == (65536, 0.995, 0.4)
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.warmup_steps) == (1e-4, 1e-5, 2000)
    assert (cfg.data.max_words, cfg.data.max_tokens, cfg.model.text.fusion_layer) == (30, 25, 6)
    assert load_config(str(CONFIGS / "pretrain.yaml")) == cfg


def test_shipped_configs_load():
    demo = load_config(str(CONFIGS / "demo.yaml"))
    assert demo.model.text.bert == "demo_data/bert" and not demo.model.text.pretrained
    assert demo.optim.weight_decay == 0.02  # inherited from pretrain.yaml
    tiny = load_config(str(CONFIGS / "test_tiny.yaml"))
    assert tiny.model.vision.image_size == 32
    assert tiny.model.text.config_overrides["num_hidden_layers"] == 4  # merged from demo.yaml


def test_base_chain_merges_dicts_and_replaces_lists(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\ndata: {train_files: [a.json, b.json], max_words: 20}\n"
                               "model: {text: {config_overrides: {hidden_size: 64}}}\n")
    write(tmp_path / "sub/b.yaml", "base: ../a.yaml\nseed: 2\ndata: {train_files: [c.json]}\n")
    path = write(tmp_path / "sub/c.yaml", "base: b.yaml\nmodel: {text: {config_overrides: "
                                          "{num_hidden_layers: 8}}}\n")
    cfg = load_config(path)
    assert cfg.seed == 2 and cfg.data.max_words == 20 and cfg.data.train_files == ["c.json"]
    assert cfg.model.text.config_overrides == {"hidden_size": 64, "num_hidden_layers": 8}


def test_overrides_nested_list_and_float():
    cfg = load_config(None, ["train.batch_size=8", "loss.itc=kl", "optim.lr=3e-4",
                             "data.train_files=[a.json, b.json]", "model.vision.depth=2",
                             "loss.weights.mlm=0", "train.clip_grad=null"])
    assert cfg.train.batch_size == 8 and cfg.loss.itc == "kl" and cfg.model.vision.depth == 2
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_files == ["a.json", "b.json"]
    assert cfg.loss.weights.mlm == 0.0 and isinstance(cfg.loss.weights.mlm, float)
    assert cfg.loss.weights.itc == 1.0 and cfg.train.clip_grad is None


def test_yaml11_exponent_strings_are_floats(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "optim: {lr: 1e-4, min_lr: 2E-6}\n"))
    assert (cfg.optim.lr, cfg.optim.min_lr) == (1e-4, 2e-6)


def test_round_trips(tmp_path):
    cfg = load_config(str(CONFIGS / "demo.yaml"), ["optim.lr=2e-4"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, str(tmp_path / "run/config.yaml"))
    assert load_config(str(tmp_path / "run/config.yaml")) == cfg


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    path = write(tmp_path / "x.yaml", "train: {bach_size: 8}\n")
    assert error_of(path) == (f"{path}: train.bach_size: unknown key "
                              "(did you mean 'train.batch_size'?)")
    assert "did you mean 'optim.lr'" in error_of(write(tmp_path / "y.yaml", "train: {lr: 1}\n"))
    assert "valid keys: " in error_of(write(tmp_path / "z.yaml", "zzz: 1\n"))


def test_error_names_the_file_that_set_the_key(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {vision: {patch_sise: 8}}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 3\n")
    message = error_of(child)
    assert message.startswith(f"{base}: model.vision.patch_sise: unknown key")
    assert "'model.vision.patch_size'" in message


@pytest.mark.parametrize("text, key, expected", [
    ("train: {batch_size: eight}", "train.batch_size", "expected int (got 'eight')"),
    ("train: {batch_size: 8.5}", "train.batch_size", "expected int (got 8.5)"),
    ("loss: {alpha_warmup: 'yes'}", "loss.alpha_warmup", "expected bool (got 'yes')"),
    ("seed: true", "seed", "expected int (got True)"),
    ("data: {train_files: a.json}", "data.train_files", "expected list[str] (got 'a.json')"),
    ("data: {mean: [0.5, x, 0.5]}", "data.mean[1]", "expected float (got 'x')"),
    ("train: 5", "train", "expected a mapping (got 5)"),
    ("output_dir: null", "output_dir", "expected str (got null)"),
])
def test_wrong_type(tmp_path, text, key, expected):
    path = write(tmp_path / "x.yaml", text + "\n")
    assert error_of(path) == f"{path}: {key}: {expected}"


@pytest.mark.parametrize("key, value, allowed", [
    ("loss.itc", "mse", "'ce', 'kl'"),
    ("train.precision", "fp8", "'auto', 'bf16', 'fp16', 'fp32'"),
    ("train.strategy", "deepspeed", "'ddp', 'fsdp'"),
    ("loss.itm_negatives", "all", "'local', 'global'"),
    ("data.format", "csv", "'json', 'wds'"),
    ("model.text.attention", "flash", "'sdpa', 'eager'"),
])
def test_bad_choice(key, value, allowed):
    message = error_of(None, [f"{key}={value}"])
    assert message == f"override '{key}={value}': {key}: expected one of {allowed} (got '{value}')"


@pytest.mark.parametrize("override, requirement", [
    ("optim.lr=-1e-4", "must be > 0"),
    ("train.batch_size=0", "must be >= 1"),
    ("loss.mlm_probability=1.0", "must be in (0, 1)"),
    ("loss.mlm_probability=-0.1", "must be in (0, 1)"),
    ("model.text.fusion_layer=-1", "must be >= 0"),
    ("loss.alpha=1.5", "must be in [0, 1]"),
    ("model.temp=0.9", "must be in [0.001, 0.5]"),
    ("data.crop_scale=[1.0, 0.2]", "must be [min, max] with min <= max"),
    ("data.crop_scale=[0.0, 1.0]", "values must be in (0, 1]"),
    ("optim.betas=[0.9, 1.5]", "values must be in [0, 1)"),
    ("model.vision.mlp_ratio=0", "must be in (0, 64]"),
    ("model.vision.embed_dim=1000000", "must be in [1, 16384]"),
    ("train.keep_last=0", "must be >= 1"),
    ("train.grad_accum=0", "must be >= 1"),
    ("model.vision.patch_size=7", "must divide model.vision.image_size (256)"),
    ("loss.weights={itc: 0, itm: 0, mlm: 0}", "at least one must be > 0"),
    ("loss.weights.itm=-1", "must be >= 0"),
    ("optim.lr=.inf", "expected a finite number"),
])
def test_impossible_value(override, requirement):
    key = override.split("=")[0]
    message = error_of(None, [override])
    assert message.startswith(f"override '{override}': {key}: ") and requirement in message


def test_impossible_value_from_file_names_file(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  batch_size: 0\n")
    assert error_of(path) == f"{path}: train.batch_size: must be >= 1 (got 0)"


def test_check_paths_names_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.json", "[]")
    path = write(tmp_path / "x.yaml", "data: {train_files: [a.json, missing.json]}\n")
    cfg = load_config(path)  # schema validation alone does not touch the file system
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert str(info.value).startswith(f"{path}: data.train_files[1]: file not found: "
                                      "'missing.json'")
    cfg = load_config(path, ["data.train_files=[a.json]", "model.text.bert=./nobert"])
    with pytest.raises(ConfigError, match=r"model\.text\.bert: directory not found: './nobert'"):
        check_paths(cfg)
    cfg = load_config(path, ["data.train_files=[a.json]", "model.vision.checkpoint=deit.pth"])
    with pytest.raises(ConfigError, match=r"model\.vision\.checkpoint: file not found"):
        check_paths(cfg)
    check_paths(load_config(path, ["data.train_files=[a.json]"]))  # hub ids are not paths


def test_check_paths_rejects_unknown_bert_field():
    cfg = load_config(None, ["data.train_files=[]", "data.format=wds", "data.shards=s.tar",
                             "data.num_samples=100", "model.text.config_overrides={hidden_sise: 64}"])
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert str(info.value) == ("override 'model.text.config_overrides={hidden_sise: 64}': "
                               "model.text.config_overrides.hidden_sise: not a BertConfig field "
                               "(did you mean 'hidden_size'?)")


def test_missing_base_and_missing_file(tmp_path):
    path = write(tmp_path / "x.yaml", "base: nope.yaml\n")
    assert error_of(path) == f"{path}: base: config file not found: '{tmp_path / 'nope.yaml'}'"
    assert "config file not found" in error_of(str(tmp_path / "absent.yaml"))


def test_base_cycle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    assert "inheritance cycle" in error_of(write(tmp_path / "b.yaml", "base: a.yaml\n"))


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  batch_size: 8\n  epochs: [1, 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}: YAML syntax error at line ") and "column" in message


def test_non_mapping_yaml(tmp_path):
    path = write(tmp_path / "x.yaml", "- a\n- b\n")
    assert error_of(path).startswith(f"{path}: top level must be a mapping")


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size", "expected key.sub=value"),
    ("=3", "expected key.sub=value"),
    ("train.bach_size=8", "train.bach_size: unknown key (did you mean 'train.batch_size'?)"),
    ("train.epochs=[1", "value is not valid YAML"),
])
def test_bad_override(override, expected):
    message = error_of(None, [override])
    assert message.startswith(f"override '{override}': ") and expected in message


def test_from_dict_validates():
    data = Config().to_dict()
    data["train"]["batch_size"] = "64"
    with pytest.raises(ConfigError, match=r"^ckpt\.pt: train\.batch_size: expected int"):
        Config.from_dict(data, source="ckpt.pt")


def test_webdataset_needs_samples_per_epoch():
    with pytest.raises(ConfigError, match=r"data\.num_samples: must give the samples per epoch"):
        load_config(None, ["data.format=wds", "data.shards=s.tar"])
