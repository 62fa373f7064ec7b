"""Run configuration: dataclasses, YAML files, ``key.sub=value`` overrides, validation.

Two files describe a run:

* the **run config** (YAML, this module): model, LoRA-SB settings, data, optimizer and schedule;
* the **DeepSpeed config** (JSON, ``--ds_config``): batch sizes, ZeRO stage, precision, monitoring.

Each setting lives in exactly one of them. The optimizer and the learning-rate schedule belong to the
run config (only the r x r matrices are trained, so the optimizer is built here, not by DeepSpeed);
batch sizes belong to the DeepSpeed config. Everything is checked before any model is loaded, and
every error names the setting and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError  # noqa: F401  (also imported from here)
from .glue import task_of
from .methods import METHODS

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


TASKS = ("causal_lm", "seq_cls")


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Hub name or local directory for ``from_pretrained``; empty: the built-in tiny model of the task
    (a Llama for ``causal_lm``, a RoBERTa encoder for ``seq_cls``)."""
    task: str = "causal_lm"
    """``causal_lm`` (instruction tuning, ``AutoModelForCausalLM``) or ``seq_cls`` (sequence
    classification, ``AutoModelForSequenceClassification``; with ``data.format: glue``)."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing of the decoder layers."""
    trust_remote_code: bool = False




@dataclass
class LoraSBConfig:
    method: str = "lorasb"
    """What is trained, all in the same pipeline: ``lorasb`` (R; B, A from the estimated update),
    ``loraxs`` (R; B, A from the SVD of W0), ``lora`` (B and A, PEFT-style init and scaling
    ``lora_alpha / r``) or ``full`` (every weight; no adapter layers)."""
    r: int = 16
    """Rank: B is out x r, A is r x in, the trained R is r x r."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    """Module-name suffixes to wrap (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path never sees it)."""
    fuse_projections: bool = False
    """Targets that read one input (q/k/v, gate/up) compute their ``x A^T`` in one matmul (frozen A and
    no dropout only; the result is the same). Off by default: on 2 CPU ranks it was 2-13% slower per
    step at three model shapes (bench/README.md); for GPUs, ``bench/gpu_check.sh`` times both."""
    update: str = "sign"
    """Approximation of the first full fine-tuning update: ``sign`` (-lr_eff*sign(G), Adam's first
    step) or ``sgd`` (-lr_eff*G)."""
    lr_eff: float | None = None
    """Step size of that first update. Empty: ``train.lr / warmup_steps``, the learning rate of the
    first warm-up step of this run. The value used is recorded in the init file."""
    est_samples: int = 50
    """Training samples whose gradient is summed for the estimate (reference: 50 for math)."""
    est_micro_batch: int = 3
    """Micro-batch size of the estimation pass, per rank."""
    est_max_accum_gb: float | None = None
    """Most GB (10^9 bytes) of fp32 gradient accumulators a rank holds at once: the modules are split, in
    model order, into groups that fit, each estimated in its own pass over the same batches (the same
    G). Empty: every module in one pass. ``lorasb plan --device_memory_gb`` suggests a value."""
    est_bucket_mb: float = 16.0
    """The estimation reduces the local gradients of modules with the same owner together, in buckets
    of this many MB (10^6 bytes); 0: each module on its own."""
    svd: str = "converged"
    """``converged`` (block Krylov, grown until the captured energy stops rising; exact on narrow
    matrices), ``randomized`` (torch.svd_lowrank, a fixed number of iterations, as the reference code)
    or ``exact`` (torch.linalg.svd)."""
    svd_oversample: int = 16
    """Columns beyond r of each random block (the sketch of ``randomized``, a Krylov block of
    ``converged``)."""
    svd_niter: int = 10
    """Power iterations of ``randomized``."""
    svd_tol: float = 1e-4
    """``converged`` stops when one more block raises the captured top-r energy by less than this
    (relative)."""
    svd_max_iter: int = 32
    """``converged``: at most this many Krylov blocks."""
    lora_alpha: float | None = None
    """``method: lora`` only: the scaling is lora_alpha / r; empty: 2 r."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapter (name suffixes, e.g. ``classifier``): saved in the
    adapter and exported as PEFT ``modules_to_save``. Empty: the classification head (``classifier``
    or ``score``) for ``model.task: seq_cls``, nothing for ``causal_lm``."""


@dataclass
class DataConfig:
    path: str | None = None
    """Where the rows come from: a local ``.json``/``.jsonl``/``.parquet`` file, a local directory
    (``datasets.load_dataset`` on it, or ``load_from_disk`` when it was written by ``save_to_disk``),
    or a hub dataset name such as ``meta-math/MetaMathQA``; empty: built-in synthetic math."""
    format: str = "metamath"
    """Row layout: ``metamath`` (query/response), ``alpaca`` (instruction/input/output),
    ``commonsense`` (LLM-Adapters: instruction/input/output/answer), ``chat`` (messages) or ``glue``
    (the columns of ``data.glue_task`` and ``label``; for ``model.task: seq_cls``)."""
    glue_task: str | None = None
    """``data.format: glue`` only: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli (also the
    hub subset when ``data.subset`` is empty)."""
    subset: str | None = None
    """Configuration of a hub dataset or directory (e.g. ``main`` for ``openai/gsm8k``)."""
    split: str = "train"
    """Split of a hub dataset or directory; a single file is one split and takes the default only."""
    builtin_size: int = 2000
    """Number of rows of the built-in synthetic dataset."""
    query_field: str = "query"
    """Query column of ``format: metamath``."""
    response_field: str = "response"
    """Response column of ``format: metamath``."""
    prompt_template: str = "alpaca"
    """``alpaca`` (the MetaMathQA/GSM8K prompt), ``plain`` (the query and a newline) or ``chat`` (the query
    as the user turn of the tokenizer's chat template); ``format: metamath`` only, the other formats build
    their own prompt."""
    max_length: int = 512
    """Longest tokenized sample; longer ones are truncated and counted."""
    eval_path: str | None = None
    """Held-out rows for the validation loss: a local file or directory in ``data.format``."""
    eval_split: str | None = None
    """Held-out split of ``data.path`` (a directory or hub dataset), e.g. ``validation``."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training rows (a seeded choice) for the validation loss."""

    def held_out(self) -> str | None:
        """Which setting gives the held-out set (None: no validation)."""
        given = [name for name, value in (("data.eval_path", self.eval_path), ("data.eval_split", self.eval_split),
                                          ("data.eval_fraction", self.eval_fraction)) if value]
        return given[0] if given else None

    def source_kind(self) -> str:
        """``builtin``, ``file``, ``dir`` or ``hub``; a local-looking path that is not there is an error.

        A path is read as a hub dataset name only when nothing exists at it and it looks like one:
        ``name`` or ``owner/name`` made of letters, digits, ``-``, ``_`` and ``.``, not starting with
        ``.``, ``/`` or ``~`` and not ending in a data-file extension (``data/train.jsonl`` that is
        missing is "no such file", never a hub lookup).
        """
        if not self.path:
            return "builtin"
        expanded = os.path.expanduser(self.path)
        if os.path.isfile(expanded):
            return "file"
        if os.path.isdir(expanded):
            return "dir"
        if not could_be_hub_name(self.path):
            raise ConfigError(f"data.path: no such file or directory '{self.path}' (a hub dataset is "
                              "named like owner/name, e.g. meta-math/MetaMathQA)")
        return "hub"


def could_be_hub_name(path: str) -> bool:
    """Whether a path that exists nowhere locally may be read as a hub repository name: ``name`` or
    ``owner/name`` of letters, digits, ``-``, ``_``, ``.``, not starting with ``.``, ``/`` or ``~`` and
    not ending in a data-file extension (a missing ``data/train.jsonl`` is "no such file", never a
    hub lookup)."""
    import re

    data_suffixes = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip",
                     ".bz2", ".xz", ".zst")
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", path) is not None
            and not path.lower().endswith(data_suffixes))


@dataclass
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.02
    schedule: str = "cosine"
    """``cosine``, ``linear`` (both decay to 0 after warm-up) or ``constant``."""
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps to run; 0: as many as ``epochs`` passes over the data give."""
    log_every: int = 1
    seed: int = 42
    output_dir: str = "outputs/run"
    init_file: str | None = None
    """An init file of an earlier run: reuse its B, A, R and skip the estimation pass."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0: only at the end (and on preemption)."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    resume: str | None = None
    """``auto`` (the newest complete checkpoint of output_dir, if any) or a checkpoint directory."""
    overwrite: bool = False
    """Allow starting a new run in an output_dir that already holds one."""
    dist_timeout_minutes: float = 30.0
    """Timeout of every collective (raise it for very long model loads or SVDs)."""
    eval_every: int = 0
    """Optimizer steps between validation losses on the held-out set (``data.eval_*``); 0: at the end only."""
    early_stopping_patience: int = 0
    """Stop (checkpoint and adapter written) after this many validations in a row without a new best
    validation loss; 0: never."""
    keep_best: bool = False
    """Checkpoint at every new best validation loss, keep that checkpoint whatever ``keep_last`` says,
    and write the adapter from it at the end."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lorasb: LoraSBConfig = field(default_factory=LoraSBConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type hint; numbers written as text ("1e-3") are read."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    origin = typing.get_origin(kind)
    if isinstance(value, _OverrideText):  # command-line text: verbatim for text fields, else YAML
        if kind is str and not (optional and value.strip() in ("", "null", "~")):
            return str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot read {str(value)!r}: {e.problem}") from None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        value = [_coerce(v, item, key) for v in value]
        if origin is tuple and len(value) != len(typing.get_args(kind)):
            raise ConfigError(f"{key}: expected {len(typing.get_args(kind))} values, got {len(value)}")
        return origin(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    return value


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown setting '{path}'; valid keys here: {', '.join(sorted(hints))}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section: give it a mapping, not {value!r}")
            _apply(current, value, f"{path}.")
        else:
            setattr(section, key, _coerce(value, hints[key], path))


class _OverrideText(str):
    """A value from the command line, read according to the type of the field it sets."""


def parse_override(text: str) -> dict[str, Any]:
    """``"lorasb.r=32"`` -> ``{"lorasb": {"r": "32"}}``. The value stays text until it meets its field:
    text fields take it verbatim, others read it as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. lorasb.r=32)")
    dotted, raw = text.split("=", 1)
    nested: Any = _OverrideText(raw)
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    return nested


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from nested sections (as in ``run_config.json`` of a run)."""
    cfg = RunConfig()
    _apply(cfg, values, "")
    validate_run_config(cfg)
    return cfg


def load_run_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file, then each override in order; validated."""
    cfg = RunConfig()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file '{path}'")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
        _apply(cfg, values, "")
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    s, t, d = cfg.lorasb, cfg.train, cfg.data
    checks = [
        (s.method in METHODS, f"lorasb.method must be one of {', '.join(METHODS)}, got '{s.method}'"),
        (s.lora_alpha is None or s.method not in METHODS or METHODS[s.method].alpha_scaled,
         f"lorasb.lora_alpha applies to lorasb.method=lora only; method {s.method} has no scaling: drop it"),
        (s.lora_alpha is None or s.lora_alpha > 0, f"lorasb.lora_alpha must be positive, got {s.lora_alpha}"),
        (s.r > 0, f"lorasb.r must be a positive integer, got {s.r}"),
        (len(s.target_modules) > 0, "lorasb.target_modules is empty: name at least one module suffix"),
        (0.0 <= s.dropout < 1.0, f"lorasb.dropout must be in [0, 1), got {s.dropout}"),
        (s.update in ("sign", "sgd"), f"lorasb.update must be 'sign' or 'sgd', got '{s.update}'"),
        (s.lr_eff is None or s.lr_eff > 0, f"lorasb.lr_eff must be positive or empty, got {s.lr_eff}"),
        (s.est_samples > 0, f"lorasb.est_samples must be at least 1, got {s.est_samples}"),
        (s.est_micro_batch > 0, f"lorasb.est_micro_batch must be at least 1, got {s.est_micro_batch}"),
        (s.est_bucket_mb >= 0, f"lorasb.est_bucket_mb must be 0 or more, got {s.est_bucket_mb}"),
        (s.est_max_accum_gb is None or s.est_max_accum_gb > 0,
         f"lorasb.est_max_accum_gb must be positive or empty, got {s.est_max_accum_gb}"),
        (s.svd in ("converged", "randomized", "exact"),
         f"lorasb.svd must be 'converged', 'randomized' or 'exact', got '{s.svd}'"),
        (s.svd_oversample >= 0, f"lorasb.svd_oversample must be >= 0, got {s.svd_oversample}"),
        (s.svd_niter >= 0, f"lorasb.svd_niter must be >= 0, got {s.svd_niter}"),
        (0 <= s.svd_tol < 1, f"lorasb.svd_tol must be in [0, 1), got {s.svd_tol}"),
        (s.svd_max_iter >= 1, f"lorasb.svd_max_iter must be >= 1, got {s.svd_max_iter}"),
        (d.format in ("metamath", "alpaca", "commonsense", "chat", "glue"),
         f"data.format must be 'metamath', 'alpaca', 'commonsense', 'chat' or 'glue', got '{d.format}'"),
        (cfg.model.task in TASKS, f"model.task must be 'causal_lm' or 'seq_cls', got '{cfg.model.task}'"),
        ((d.format == "glue") == (cfg.model.task == "seq_cls"),
         f"data.format={d.format} and model.task={cfg.model.task} do not go together: GLUE data trains a "
         "classifier (data.format: glue with model.task: seq_cls), the other formats a causal LM"),
        (d.format == "glue" or d.glue_task is None,
         f"data.glue_task applies to data.format=glue only; drop it or set data.format: glue"),
        (s.modules_to_save is None or all(m.strip() for m in s.modules_to_save),
         "lorasb.modules_to_save holds an empty name"),
        (d.prompt_template in ("alpaca", "plain", "chat"),
         f"data.prompt_template must be 'alpaca', 'plain' or 'chat', got '{d.prompt_template}'"),
        (d.format == "metamath" or d.prompt_template == "alpaca",
         f"data.prompt_template={d.prompt_template} applies to data.format=metamath only; "
         f"data.format={d.format} builds its own prompt: drop the setting"),
        (d.format == "metamath" or (d.query_field, d.response_field) == ("query", "response"),
         f"data.query_field/data.response_field apply to data.format=metamath only; "
         f"data.format={d.format} has fixed columns: drop the settings"),
        (bool(d.split.strip()), "data.split is empty: name a split such as 'train'"),
        (d.max_length >= 8, f"data.max_length must be at least 8, got {d.max_length}"),
        (d.builtin_size > 0, f"data.builtin_size must be positive, got {d.builtin_size}"),
        (t.lr > 0, f"train.lr must be positive, got {t.lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (all(0.0 <= b < 1.0 for b in t.betas), f"train.betas must both be in [0, 1), got {list(t.betas)}"),
        (t.eps > 0, f"train.eps must be positive, got {t.eps}"),
        (0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.schedule in ("cosine", "linear", "constant"),
         f"train.schedule must be 'cosine', 'linear' or 'constant', got '{t.schedule}'"),
        (t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}"),
        (t.max_steps >= 0, f"train.max_steps must be >= 0 (0: run the epochs), got {t.max_steps}"),
        (t.log_every >= 1, f"train.log_every must be at least 1, got {t.log_every}"),
        (t.save_every >= 0, f"train.save_every must be >= 0 (0: only at the end), got {t.save_every}"),
        (t.keep_last >= 1, f"train.keep_last must be at least 1, got {t.keep_last}"),
        (t.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be positive"),
        (bool(t.output_dir), "train.output_dir is empty: name a directory for the run's outputs"),
        (t.eval_every >= 0, f"train.eval_every must be >= 0 (0: at the end only), got {t.eval_every}"),
        (t.early_stopping_patience >= 0,
         f"train.early_stopping_patience must be >= 0 (0: never stop early), got {t.early_stopping_patience}"),
        (0.0 <= d.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}"),
        (sum(bool(v) for v in (d.eval_path, d.eval_split, d.eval_fraction)) <= 1,
         "data.eval_path, data.eval_split and data.eval_fraction each name a held-out set: set one of them"),
        (d.held_out() or not (t.eval_every or t.early_stopping_patience),
         f"train.{'eval_every' if t.eval_every else 'early_stopping_patience'} needs a held-out set: set "
         "data.eval_path, data.eval_split or data.eval_fraction"),
        (d.held_out() or not t.keep_best,
         "train.keep_best needs a held-out set: set data.eval_path, data.eval_split or data.eval_fraction"),
        (t.eval_every or not t.early_stopping_patience,
         "train.early_stopping_patience counts validations: set train.eval_every (steps between them) too"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if t.init_file and not os.path.isfile(t.init_file):
        raise ConfigError(f"train.init_file: no such file '{t.init_file}'")
    if d.format == "glue":
        task_of(d.glue_task)
    kind = d.source_kind()
    if kind == "builtin" and d.format != "metamath":
        raise ConfigError(f"data.format={d.format} needs data.path: the built-in synthetic set (no "
                          "data.path) has the metamath format")
    if kind == "file" and (d.split != "train" or d.subset):
        raise ConfigError(f"data.path '{d.path}' is a single file, which is one split: data.split and "
                          "data.subset apply to directories and hub datasets only; drop them")
    if d.eval_split and kind in ("file", "builtin"):
        raise ConfigError(f"data.eval_split applies to a directory or hub dataset in data.path; "
                          f"{'a single file is one split' if kind == 'file' else 'the built-in data has none'}: "
                          "hold out rows with data.eval_fraction or give data.eval_path")
    if d.eval_path and not os.path.exists(os.path.expanduser(d.eval_path)):
        raise ConfigError(f"data.eval_path: no such file or directory '{d.eval_path}'")


# --------------------------------------------------------------------------- DeepSpeed config


@dataclass(frozen=True)
class BatchLayout:
    """The DeepSpeed batch-size triple resolved against the real world size."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    world_size: int


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_auto(v, f"{path}[{i}]")
            if found:
                return found
    elif node == "auto":
        return path
    return None


def load_ds_config(path: str) -> dict[str, Any]:
    """Read the DeepSpeed JSON and reject what this tool cannot honour, before any heavy work."""
    if not path:
        raise ConfigError("--ds_config is required (e.g. --ds_config ds_configs/zero3.json)")
    if not os.path.isfile(path):
        raise ConfigError(f"--ds_config: no such file '{path}'")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object")
    auto = _find_auto(ds)
    if auto:
        raise ConfigError(
            f"--ds_config {path}: '{auto}' is \"auto\"; only the HF Trainer resolves \"auto\", "
            "give a concrete value"
        )
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(
                f"--ds_config {path}: remove the '{block}' block; the optimizer over the R matrices "
                "and its schedule are set in the run config (train.lr, train.schedule, ...)"
            )
    for block in ("fp16", "bf16", "zero_optimization", "tensorboard"):
        if block in ds and not isinstance(ds[block], dict):
            raise ConfigError(f"--ds_config {path}: '{block}' must be an object such as "
                              f"{{\"enabled\": true}}, got {ds[block]!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"--ds_config {path}: fp16.enabled and bf16.enabled are both true; pick one")
    return ds


def precision(ds: dict[str, Any]) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``, as the DeepSpeed config asks."""
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled"):
            return name
    return "fp32"


def check_precision(ds: dict[str, Any], accelerator_name: str) -> None:
    if precision(ds) == "fp16" and accelerator_name == "cpu":
        raise ConfigError(
            "--ds_config: fp16.enabled is true but the accelerator is the CPU, which has no fp16 "
            "training; use bf16.enabled or fp32"
        )


def resolve_batch_layout(ds: dict[str, Any], world_size: int) -> BatchLayout:
    """Check train_batch_size == micro_batch * grad_accum * world_size, filling at most one gap."""
    tbs = ds.get("train_batch_size")
    mb = ds.get("train_micro_batch_size_per_gpu")
    ga = ds.get("gradient_accumulation_steps")
    for name, v in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mb),
                    ("gradient_accumulation_steps", ga)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"--ds_config: {name} must be a positive integer, got {v!r}")
    if mb is None and tbs is None:
        raise ConfigError("--ds_config: set train_micro_batch_size_per_gpu (and optionally "
                          "gradient_accumulation_steps / train_batch_size)")
    if mb is None:
        ga = ga or 1
        if tbs % (ga * world_size):
            raise ConfigError(f"--ds_config: train_batch_size {tbs} is not divisible by "
                              f"gradient_accumulation_steps {ga} x world size {world_size}")
        mb = tbs // (ga * world_size)
    if ga is None:
        if tbs is None:
            ga = 1
        elif tbs % (mb * world_size):
            raise ConfigError(f"--ds_config: train_batch_size {tbs} is not divisible by "
                              f"train_micro_batch_size_per_gpu {mb} x world size {world_size}")
        else:
            ga = tbs // (mb * world_size)
    if tbs is None:
        tbs = mb * ga * world_size
    if tbs != mb * ga * world_size:
        raise ConfigError(
            f"--ds_config: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mb} x "
            f"gradient_accumulation_steps {ga} x world size {world_size} (= {mb * ga * world_size}); "
            "fix one of the three or drop train_batch_size to let it follow"
        )
    return BatchLayout(micro_batch=mb, grad_accum=ga, global_batch=tbs, world_size=world_size)
