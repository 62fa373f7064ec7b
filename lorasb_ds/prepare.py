"""Everything a run decides before any heavy work: the checks of configs, data, targets, init file and
checkpoint, the tokenized data and the step counts. No process group is started and no weight is
loaded here, so bad input fails in seconds with a ``ConfigError`` (exit 2) and leaves nothing behind.

Every rank runs ``prepare`` and gets the same ``Prepared``; ``dry_run`` prints it with the memory plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .checkpoint import check_output_dir, resume_point
from .config import BatchLayout, ConfigError, RunConfig, check_precision, precision, resolve_batch_layout
from .data import describe_truncation, estimation_indices, fingerprint, load_rows, split_held_out, tokenize_rows
from .ranks import device_memory_per_rank, say_once, world_size_from_env  # say_once: every rank prepares the same run
from .estimate import assign_owners, estimation_groups, max_accum_bytes
from .files import check_init_metadata, is_own_init_file, own_init_file, read_init_metadata
from .init import init_metadata
from .layer import shape_of
from .methods import METHODS
from .modeling import auto_class, check_model_source, load_tokenizer, model_config_of
from .schedule import Schedule, make_schedule
from .surgery import find_targets, modules_to_save


@dataclass
class Prepared:
    """The outcome of the checks: everything decided before any heavy work. The same on every rank."""

    cfg: RunConfig
    ds_config: dict
    """The DeepSpeed config as the engine gets it (a TensorBoard folder filled in)."""
    layout: BatchLayout
    tokenizer: object
    examples: list[dict]
    """Tokenized training examples (``input_ids``, ``labels``)."""
    eval_examples: list[dict]
    """Tokenized held-out examples for the validation loss (empty: no validation)."""
    truncated: int
    """Examples cut at ``data.max_length``."""
    schedule: Schedule
    data_fingerprint: str | None
    """Of the estimation data: kept in the init file, checked on resume."""
    resume_from: str | None
    """The checkpoint this run continues, if any."""
    marker: dict | None
    """That checkpoint's marker."""


def prepare(cfg: RunConfig, ds_config: dict) -> Prepared:
    """Every check of configs, data, targets, init file and checkpoint; raises ConfigError.

    Sets ``cfg.train.init_file`` to the file B and A come from when the run does not estimate them
    (given, or the run's own when it resumes)."""
    from deepspeed.accelerator import get_accelerator

    check_output_dir(cfg)
    resume_from, marker = resume_point(cfg)
    if cfg.train.resume:  # say what --resume found, either way
        say_once(f"[lorasb] --resume {cfg.train.resume}: " + (
            f"continuing from {resume_from} (step {marker['step']})" if marker is not None else
            f"no complete checkpoint in {cfg.train.output_dir}; starting a new run"))
    init_file = cfg.train.init_file
    if marker is not None:  # B and A come from the run's own init file: never estimated again
        init_file = marker["init_file"]
    elif cfg.train.resume and os.path.isfile(own_init_file(cfg.train.output_dir)):
        init_file = own_init_file(cfg.train.output_dir)  # killed before its first checkpoint
    cfg.train.init_file = init_file
    check_model_source(cfg.model)
    layout = resolve_batch_layout(ds_config, world_size_from_env())
    check_precision(ds_config, get_accelerator().device_name())
    check_targets_without_weights(cfg, layout.world_size)
    tokenizer = load_tokenizer(cfg.model)
    rows, eval_rows = split_held_out(load_rows(cfg.data, cfg.train.seed), cfg.data, cfg.train.seed)
    examples, truncated = tokenize_rows(rows, tokenizer, cfg.data)
    eval_examples = tokenize_rows(eval_rows, tokenizer, cfg.data)[0] if eval_rows is not None else []
    say_once(f"[lorasb] data: {describe_truncation(truncated, cfg.data.max_length, len(rows), len(examples))}"
             + (f"; {len(eval_examples)} held out for validation ({cfg.data.held_out()})" if eval_rows is not None
                else ""))
    schedule = make_schedule(cfg, len(examples), layout.micro_batch, layout.grad_accum, layout.world_size)
    data_fingerprint = None  # of the estimation data: needed to estimate, or to check a resume
    if METHODS[cfg.lorasb.method].estimates and (not init_file or cfg.train.resume):
        data_fingerprint = fingerprint(
            examples, estimation_indices(cfg.lorasb.est_samples, len(examples), cfg.train.seed))
    if init_file:
        meta = read_init_metadata(init_file)
        check_init_metadata(init_file, meta, init_metadata(cfg))
        if marker is not None and meta.get("init_id") != marker["init_id"]:
            raise ConfigError(f"--resume {resume_from}: its init file {init_file} was replaced since; "
                              "restore it or start a new run")
        same_data = meta.get("data_fingerprint") == data_fingerprint
        if cfg.train.resume and is_own_init_file(init_file, cfg.train.output_dir) and not same_data:
            raise ConfigError(f"--resume: the estimation data differ from those that made {init_file} "
                              "(the data file changed?); resume with the original data or start a new run")
    for monitor, folder in (("tensorboard", "tensorboard"), ("csv_monitor", "csv")):  # in the run's folder
        section = ds_config.get(monitor)
        if section and section.get("enabled") and not section.get("output_path"):
            ds_config = dict(ds_config, **{monitor: dict(section, output_path=os.path.join(cfg.train.output_dir,
                                                                                           folder))})
    return Prepared(cfg=cfg, ds_config=ds_config, layout=layout, tokenizer=tokenizer, examples=examples,
                    eval_examples=eval_examples, truncated=truncated, schedule=schedule, data_fingerprint=data_fingerprint,
                    resume_from=resume_from, marker=marker)


def check_targets_without_weights(cfg: RunConfig, world: int) -> None:
    """Fail on bad targets, rank, modules to save or accumulator budget from the model's config alone,
    before any weight is loaded."""
    method = METHODS[cfg.lorasb.method]
    if not method.wraps:
        return
    with torch.device("meta"):
        skeleton = auto_class(cfg.model.task).from_config(model_config_of(cfg),
                                                          trust_remote_code=cfg.model.trust_remote_code)
    found = find_targets(skeleton, cfg.lorasb.target_modules, cfg.lorasb.r)
    modules_to_save(skeleton, cfg.lorasb.modules_to_save, cfg.model.task)
    if method.estimates:
        shapes = {name: shape_of(module) for name, module in found}
        estimation_groups(shapes, assign_owners(shapes, world), max_accum_bytes(cfg.lorasb.est_max_accum_gb))


def dry_run(p: Prepared, device_memory_gb: float | None = None) -> dict:
    """Print what a run would do (layout, steps, memory per rank) after every check, and whether its plan
    fits ``device_memory_gb`` per rank (None: this device's, ``ranks.device_memory_per_rank``); start nothing."""
    from .plan import fit_on_device, format_plan, plan_memory

    cfg, layout = p.cfg, p.layout
    summary = {"dry_run": True, "method": cfg.lorasb.method, "world_size": layout.world_size,
               "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
               "global_batch": layout.global_batch, "samples": len(p.examples), "truncated": p.truncated,
               "eval_samples": len(p.eval_examples),
               "steps": p.schedule.total_steps, "warmup_steps": p.schedule.warmup_steps,
               "lr_eff": p.schedule.lr_eff, "init_file": cfg.train.init_file, "resume_from": p.resume_from}
    estimates = METHODS[cfg.lorasb.method].estimates  # the memory plan models LoRA-SB's estimation and R
    if not estimates:
        say_once(json.dumps(summary, indent=2) + "\n[lorasb] the memory plan models lorasb.method=lorasb only; "
                 f"not printed for {cfg.lorasb.method}")
        return summary
    zero = p.ds_config.get("zero_optimization", {})
    buckets = {k: zero[k] for k in ("reduce_bucket_size", "prefetch_bucket_size") if k in zero}
    if "stage3_prefetch_bucket_size" in zero:
        buckets["prefetch_bucket_size"] = zero["stage3_prefetch_bucket_size"]
    layer_plan = plan_memory(model_config_of(cfg), cfg.lorasb.r, cfg.lorasb.target_modules, layout.world_size,
                             layout.micro_batch, cfg.data.max_length, precision(p.ds_config),
                             bool(zero.get("offload_param")), cfg.model.gradient_checkpointing,
                             cfg.lorasb.est_micro_batch, **buckets, est_max_accum_gb=cfg.lorasb.est_max_accum_gb,
                             est_bucket_mb=cfg.lorasb.est_bucket_mb)
    where = "--device_memory_gb"
    if device_memory_gb is None:
        device_memory_gb, where = device_memory_per_rank()
    # with no accumulator budget set, the fewest estimation passes that fit (as lorasb plan --device_memory_gb)
    fit = fit_on_device(layer_plan, device_memory_gb, budget_set=cfg.lorasb.est_max_accum_gb is not None)
    summary.update(device_memory_gb=round(device_memory_gb, 2), fits=fit.fits, est_passes=fit.plan.est_passes,
                   **{f"{k}_gb": round(v / 1e9, 3) for k, v in (("estimation_peak", fit.plan.estimation_peak),
                                                                ("training_peak", fit.plan.training_peak),
                                                                ("accumulators", fit.plan.owner_accumulator_max))})
    text = (json.dumps(summary, indent=2) + "\n" + format_plan(layer_plan)
            + f"\n\non {device_memory_gb:.2f} GB per rank ({where}): " + "\n".join(fit.lines))
    say_once(text)  # every rank computed the same plan
    return summary
