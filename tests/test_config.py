"""Run config (YAML + overrides, validation) and DeepSpeed config checks (JSON, batch triple, precision)."""

import json
import os

import pytest

from lorasb_ds.config import (
    LLAMA_TARGETS,
    BatchLayout,
    ConfigError,
    RunConfig,
    check_precision,
    load_ds_config,
    load_run_config,
    parse_override,
    resolve_batch_layout,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- run config


def test_defaults_without_file():
    cfg = load_run_config()
    assert cfg == RunConfig()
    assert cfg.lorasb.target_modules == LLAMA_TARGETS and cfg.lorasb.r == 16


def test_yaml_values_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "run.yaml", "lorasb:\n  r: 8\n  dropout: 0.1\ntrain:\n  lr: 0.01\n  epochs: 3\n")
    cfg = load_run_config(path, ["lorasb.r=32", "train.epochs=2", "lorasb.r=24"])
    assert cfg.lorasb.r == 24  # the later override wins
    assert cfg.train.epochs == 2  # override beats the file
    assert cfg.lorasb.dropout == 0.1 and cfg.train.lr == 0.01  # file beats the defaults
    assert cfg.train.weight_decay == 0.01  # untouched default


def test_scientific_notation_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-3" as text; float fields still accept it.
    path = write(tmp_path, "run.yaml", "train:\n  lr: 1e-3\n  eps: 1e-6\n")
    cfg = load_run_config(path, ["lorasb.lr_eff=5e-4"])
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.eps == 1e-6 and type(cfg.train.eps) is float
    assert cfg.lorasb.lr_eff == 5e-4 and type(cfg.lorasb.lr_eff) is float


def test_integer_for_float_field_becomes_float():
    cfg = load_run_config(overrides=["train.lr=1"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_lists_from_comma_text_and_yaml_lists(tmp_path):
    cfg = load_run_config(overrides=["lorasb.target_modules=q_proj,v_proj", "train.betas=0.8,0.95"])
    assert cfg.lorasb.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.betas == (0.8, 0.95) and type(cfg.train.betas) is tuple
    path = write(tmp_path, "run.yaml", "lorasb:\n  target_modules: [k_proj, o_proj]\n")
    assert load_run_config(path).lorasb.target_modules == ["k_proj", "o_proj"]


def test_null_for_optional_fields(tmp_path):
    path = write(tmp_path, "run.yaml", "lorasb:\n  lr_eff: 0.5\nmodel:\n  name_or_path: some/model\n")
    cfg = load_run_config(path, ["lorasb.lr_eff=null", "model.name_or_path="])
    assert cfg.lorasb.lr_eff is None and cfg.model.name_or_path is None


@pytest.mark.parametrize("override", ["lorasb.target_modules=[q_proj", "train.lr=@x"])
def test_malformed_override_value_is_a_config_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_run_config(overrides=[override])


@pytest.mark.parametrize("path", ["runs/exp #3", "on"])
def test_text_override_is_taken_verbatim(path):
    # cli.main turns --output_dir / --init_file into exactly such overrides
    assert load_run_config(overrides=[f"train.output_dir={path}"]).train.output_dir == path


def test_null_for_required_field_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.lr cannot be empty"):
        load_run_config(overrides=["train.lr=null"])


def test_parse_override():
    """Overrides stay text until they meet their field, which decides how to read them."""
    assert parse_override("lorasb.r=32") == {"lorasb": {"r": "32"}}
    assert parse_override("data.query_field=a=b") == {"data": {"query_field": "a=b"}}
    cfg = load_run_config(overrides=["lorasb.r=32", "train.lr=1e-3", "train.betas=[0.9, 0.99]",
                                     "lorasb.lr_eff=", "data.query_field=a=b"])
    assert (cfg.lorasb.r, cfg.train.lr, cfg.train.betas) == (32, 1e-3, (0.9, 0.99))
    assert cfg.lorasb.lr_eff is None and cfg.data.query_field == "a=b"
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("lorasb.r")


@pytest.mark.parametrize("text, key", [
    ("colour: red\n", "colour"),
    ("lorasb:\n  rank: 8\n", "lorasb.rank"),
    ("train:\n  learning_rate: 0.1\n", "train.learning_rate"),
])
def test_unknown_key_in_file_is_named(tmp_path, text, key):
    path = write(tmp_path, "run.yaml", text)
    with pytest.raises(ConfigError, match=rf"unknown setting '{key}'"):
        load_run_config(path)


def test_unknown_key_in_override_is_named():
    with pytest.raises(ConfigError, match=r"unknown setting 'lorasb\.alpha'"):
        load_run_config(overrides=["lorasb.alpha=16"])


@pytest.mark.parametrize("override, key", [
    ("lorasb.r=8.5", "lorasb.r"),
    ("lorasb.r=true", "lorasb.r"),
    ("lorasb.r=eight", "lorasb.r"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),
    ("model.gradient_checkpointing=3", "model.gradient_checkpointing"),
    ("lorasb.target_modules={a: 1}", "lorasb.target_modules"),
    ("train.betas=0.9", "train.betas"),
    ("lorasb=5", "lorasb"),
])
def test_wrong_type_names_the_setting(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_run_config(overrides=[override])


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(write(tmp_path, "run.yaml", "- a\n- b\n"))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "bad.yaml", "lorasb: [unclosed\n"))


@pytest.mark.parametrize("override, key", [
    ("lorasb.r=0", "lorasb.r"),
    ("lorasb.r=-4", "lorasb.r"),
    ("lorasb.target_modules=[]", "lorasb.target_modules"),
    ("lorasb.dropout=1.0", "lorasb.dropout"),
    ("lorasb.dropout=-0.1", "lorasb.dropout"),
    ("lorasb.update=foo", "lorasb.update"),
    ("lorasb.method=qlora", "lorasb.method"),
    ("lorasb.lora_alpha=16", "lorasb.lora_alpha"),
    ("lorasb.lr_eff=0", "lorasb.lr_eff"),
    ("lorasb.est_samples=0", "lorasb.est_samples"),
    ("lorasb.est_micro_batch=0", "lorasb.est_micro_batch"),
    ("lorasb.svd=foo", "lorasb.svd"),
    ("lorasb.svd_oversample=-1", "lorasb.svd_oversample"),
    ("lorasb.svd_niter=-1", "lorasb.svd_niter"),
    ("lorasb.svd_tol=1", "lorasb.svd_tol"),
    ("lorasb.svd_max_iter=0", "lorasb.svd_max_iter"),
    ("data.prompt_template=chatml", "data.prompt_template"),
    ("data.max_length=4", "data.max_length"),
    ("data.builtin_size=0", "data.builtin_size"),
    ("train.lr=0", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.schedule=foo", "train.schedule"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes"),
    ("train.output_dir=", "train.output_dir"),
    ("train.init_file=/nonexistent/init.safetensors", "train.init_file"),
    ("data.path=/nonexistent/data.jsonl", "data.path"),
])
def test_invalid_value_names_the_setting(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_run_config(overrides=[override])


def test_lora_alpha_must_be_positive():
    with pytest.raises(ConfigError, match=r"lorasb\.lora_alpha must be positive"):
        load_run_config(overrides=["lorasb.method=lora", "lorasb.lora_alpha=-1"])


def test_boundary_values_are_accepted():
    cfg = load_run_config(overrides=["lorasb.r=1", "lorasb.dropout=0", "train.warmup_ratio=0",
                                     "lorasb.svd=exact", "lorasb.update=sgd", "train.schedule=constant",
                                     "lorasb.svd_oversample=0", "lorasb.svd_niter=0", "data.max_length=8"])
    assert (cfg.lorasb.r, cfg.lorasb.svd, cfg.lorasb.update, cfg.train.schedule) == (1, "exact", "sgd", "constant")


@pytest.mark.parametrize("override", ["train.betas=1.5,0.999", "train.betas=0.9,-0.1", "train.eps=-1e-8"])
def test_invalid_adam_settings_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_run_config(overrides=[override])


# --------------------------------------------------------------------------- DeepSpeed config


def write_json(tmp_path, obj, name="ds.json"):
    return write(tmp_path, name, json.dumps(obj))


def test_ds_config_minimal_loads(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    assert load_ds_config(write_json(tmp_path, ds)) == ds


def test_ds_config_missing_path_and_file(tmp_path):
    with pytest.raises(ConfigError, match="--ds_config is required"):
        load_ds_config("")
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(str(tmp_path / "absent.json"))


def test_ds_config_not_json(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(write(tmp_path, "ds.json", "{'stage': 3,}"))
    with pytest.raises(ConfigError, match="JSON object"):
        load_ds_config(write(tmp_path, "list.json", "[1, 2]"))


@pytest.mark.parametrize("ds, key", [
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"offload_param": {"device": "cpu", "buffer_size": "auto"}}},
     "zero_optimization.offload_param.buffer_size"),
    ({"a": [{"b": 1}, {"c": "auto"}]}, "a[1].c"),
])
def test_ds_config_auto_names_key_path(tmp_path, ds, key):
    with pytest.raises(ConfigError) as e:
        load_ds_config(write_json(tmp_path, ds))
    assert f"'{key}' is \"auto\"" in str(e.value)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_ds_config_rejects_optimizer_and_scheduler(tmp_path, block):
    ds = {"train_micro_batch_size_per_gpu": 1, block: {"type": "AdamW", "params": {}}}
    with pytest.raises(ConfigError, match=f"remove the '{block}' block"):
        load_ds_config(write_json(tmp_path, ds))


def test_ds_config_fp16_and_bf16_together(tmp_path):
    ds = {"fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled"):
        load_ds_config(write_json(tmp_path, ds))
    ds["bf16"]["enabled"] = False
    assert load_ds_config(write_json(tmp_path, ds, "ok.json"))["fp16"] == {"enabled": True}


def test_check_precision():
    with pytest.raises(ConfigError, match="fp16.enabled is true but the accelerator is the CPU"):
        check_precision({"fp16": {"enabled": True}}, "cpu")
    check_precision({"fp16": {"enabled": True}}, "cuda")
    check_precision({"bf16": {"enabled": True}}, "cpu")
    check_precision({"fp16": {"enabled": False}}, "cpu")
    check_precision({}, "cpu")


@pytest.mark.parametrize("name", ["zero3.json", "zero2.json", "zero3_offload.json"])
def test_shipped_ds_configs_load(name):
    path = os.path.join(REPO, "ds_configs", name)
    ds = load_ds_config(path)
    with open(path) as f:
        assert '"auto"' not in f.read()
    assert ds["zero_optimization"]["stage"] in (2, 3)
    layout = resolve_batch_layout(ds, world_size=2)
    assert layout.global_batch == layout.micro_batch * layout.grad_accum * 2
    check_precision(ds, "cpu")


# --------------------------------------------------------------------------- batch layout


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_only_micro_given(world):
    layout = resolve_batch_layout({"train_micro_batch_size_per_gpu": 3}, world)
    assert layout == BatchLayout(micro_batch=3, grad_accum=1, global_batch=3 * world, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_micro_and_accum_given(world):
    layout = resolve_batch_layout({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 5}, world)
    assert layout == BatchLayout(micro_batch=2, grad_accum=5, global_batch=10 * world, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_total_and_micro_derive_accum(world):
    layout = resolve_batch_layout({"train_batch_size": 16 * world, "train_micro_batch_size_per_gpu": 2}, world)
    assert layout == BatchLayout(micro_batch=2, grad_accum=8, global_batch=16 * world, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_total_and_accum_derive_micro(world):
    layout = resolve_batch_layout({"train_batch_size": 12 * world, "gradient_accumulation_steps": 3}, world)
    assert layout == BatchLayout(micro_batch=4, grad_accum=3, global_batch=12 * world, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_only_total_given(world):
    layout = resolve_batch_layout({"train_batch_size": 8}, world)
    assert layout == BatchLayout(micro_batch=8 // world, grad_accum=1, global_batch=8, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_full_consistent_triple(world):
    ds = {"train_batch_size": 6 * world, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}
    assert resolve_batch_layout(ds, world) == BatchLayout(3, 2, 6 * world, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_inconsistent_triple_names_the_numbers(world):
    ds = {"train_batch_size": 6 * world + 1, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError) as e:
        resolve_batch_layout(ds, world)
    msg = str(e.value)
    assert f"train_batch_size {6 * world + 1}" in msg
    assert "train_micro_batch_size_per_gpu 3" in msg and "gradient_accumulation_steps 2" in msg
    assert f"world size {world}" in msg


def test_batch_triple_consistent_for_one_world_size_only():
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    assert resolve_batch_layout(ds, 2).global_batch == 16
    for world in (1, 4):
        with pytest.raises(ConfigError, match="train_batch_size 16"):
            resolve_batch_layout(ds, world)


@pytest.mark.parametrize("world", [2, 4])
def test_batch_total_not_divisible(world):
    with pytest.raises(ConfigError, match=rf"train_batch_size {4 * world + 1} is not divisible .* "
                                          rf"train_micro_batch_size_per_gpu 2 x world size {world}"):
        resolve_batch_layout({"train_batch_size": 4 * world + 1, "train_micro_batch_size_per_gpu": 2}, world)
    with pytest.raises(ConfigError, match=rf"train_batch_size 6 is not divisible .* "
                                          rf"gradient_accumulation_steps 4 x world size {world}"):
        resolve_batch_layout({"train_batch_size": 6, "gradient_accumulation_steps": 4}, world)


@pytest.mark.parametrize("ds, key", [
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 2.0}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": True}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": -1}, "gradient_accumulation_steps"),
    ({"train_batch_size": "8"}, "train_batch_size"),
])
def test_batch_values_must_be_positive_integers(ds, key):
    with pytest.raises(ConfigError, match=f"{key} must be a positive integer"):
        resolve_batch_layout(ds, 1)


def test_batch_needs_micro_or_total():
    with pytest.raises(ConfigError, match="set train_micro_batch_size_per_gpu"):
        resolve_batch_layout({"gradient_accumulation_steps": 4}, 1)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".yaml")))
def test_shipped_run_configs_are_valid(name, tmp_path, monkeypatch):
    """Every shipped YAML loads; data files are the user's, so a stand-in is put where they point."""
    import yaml

    path = os.path.join(REPO, "configs", name)
    data_path = (yaml.safe_load(open(path)).get("data") or {}).get("path")
    monkeypatch.chdir(tmp_path)
    if data_path:
        os.makedirs(os.path.dirname(data_path), exist_ok=True)
        open(data_path, "w").write('{"query": "q", "response": "r"}\n')
    cfg = load_run_config(path)
    assert cfg.lorasb.r > 0 and cfg.train.output_dir
