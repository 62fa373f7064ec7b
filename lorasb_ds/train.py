"""One LoRA-SB training run around a single DeepSpeed engine.

    prepare: check configs, data, targets, init file, checkpoint          (prepare.py; no heavy work)
    build:   process group -> model -> wrap targets -> deepspeed.initialize(R only)
    init:    estimation pass + owner SVDs + broadcast, or read the init file   (init.py)
    loop:    loss = engine(**batch).loss; engine.backward(loss); engine.step()
    finish:  save the adapter (R per module + the init file) and the run summary

The baselines ``lorasb.method: loraxs | lora | full`` run through the same steps: only the adapter's
initialization (``init.init_adapters``) and which tensors are trained differ.

Every rank runs ``run``; rank 0 alone writes files and logs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint
from .checkpoint import EXIT_PREEMPTED, Position, PreemptionFlag, run_identity
from .config import RunConfig, resolve_batch_layout
from .data import IGNORE_INDEX, collate, eval_batches, train_batches
from .ranks import any_rank
from .estimate import assign_owners, layer_shapes, weighted_estimation_batches
from .files import (ADAPTER_DIR_NAME, is_own_init_file, load_init_file, own_init_file, save_adapter,
                    write_run_config, write_run_summary)
from .init import apply_inits, init_adapters
from .layer import LoRASBLinear
from .methods import METHODS
from .modeling import load_model, model_dtype, num_labels_of
from .prepare import Prepared, dry_run, prepare
from .runlog import Logger
from .schedule import lr_lambda, make_schedule
from .surgery import ParameterCounts, count_parameters, modules_to_save, train_modules, wrap_targets


@dataclass
class Session:
    """What a run holds once built: its ``Prepared`` and the engine around the wrapped model.
    The same fields on every rank."""

    prepared: Prepared
    engine: object
    """The DeepSpeed engine; ``engine.module`` is the model with its targets wrapped."""
    lr_scheduler: object
    layers: dict[str, LoRASBLinear]
    """The adapter layers by module name."""
    trained: dict[str, torch.nn.Parameter]
    """Every parameter the optimizer holds, by its name in the model (LoRA-SB: ``<module>.lora_R``)."""
    modules_to_save: list[str]
    """Modules trained in full beside the adapter (a classifier's head)."""
    counts: ParameterCounts
    rank: int
    world: int
    device: torch.device
    owners: dict[str, int]
    """The rank that estimates and decomposes each module."""


def run(cfg: RunConfig, ds_config: dict, dry: bool = False, device_memory_gb: float | None = None) -> dict:
    """The whole run; returns its summary (also written to ``run_summary.json`` by rank 0).

    ``dry``: stop after the checks and print the resolved layout, the plan and whether it fits
    ``device_memory_gb`` per rank (default: the device's; ``--dry_run``)."""
    # ---- every check first: bad input fails before any process group or weight
    prepared = prepare(cfg, ds_config)
    if dry:
        return dry_run(prepared, device_memory_gb)
    out_dir = cfg.train.output_dir
    preemption = PreemptionFlag()
    s = build(prepared)
    prepared = s.prepared  # an MPI launch may have changed the layout

    # ---- B, A, R: from the init file (given, or this run's own on resume), or made now
    est_stats = None
    if cfg.train.init_file:
        init_path = cfg.train.init_file
        inits, init_meta = load_init_file(init_path, s.layers)  # checked in prepare()
    else:
        init_path = own_init_file(out_dir)
        batches = [] if not METHODS[cfg.lorasb.method].estimates else weighted_estimation_batches(
            prepared.examples, cfg.lorasb.est_samples, cfg.lorasb.est_micro_batch, s.rank, s.world, cfg.train.seed,
            prepared.tokenizer.pad_token_id)
        inits, init_meta, est_stats = init_adapters(cfg, s.engine.module, s.layers, s.owners, batches,
                                                    prepared.schedule.lr_eff, prepared.data_fingerprint, init_path,
                                                    s.device)
    apply_inits(s.layers, inits)
    position = Position()
    if prepared.resume_from:
        position, _ = checkpoint.load(s.engine, prepared.resume_from)

    # ---- the log: a resumed run continues its own from the checkpoint's step, each step once
    logger = Logger(s.engine, out_dir, s.rank, resume_step=position.step if cfg.train.resume else None)
    energies = {name: init.energy for name, init in inits.items()}
    iterations = {name: init.svd_iterations for name, init in inits.items()}
    logger.log({"event": "init", "estimated": est_stats is not None, "init_file": init_path,
                "resumed_from": prepared.resume_from, "start_step": position.step, "lr_eff": init_meta.get("lr_eff"),
                "mean_energy": sum(energies.values()) / max(1, len(energies)),
                "max_svd_iterations": max(iterations.values(), default=0)},
               tb=None if prepared.resume_from else {
                   **{f"Estimation/energy/{n}": e for n, e in energies.items()},
                   **{f"Estimation/svd_iterations/{n}": k for n, k in iterations.items()}})
    start_step = position.step

    # ---- train: R only, checkpointing as told and when a signal asks
    extra = {"init_file": os.path.abspath(init_path), "init_id": init_meta["init_id"], "run": run_identity(cfg)}
    position, preempted = train_loop(
        s, logger, position, save=lambda pos: checkpoint.save(s.engine, out_dir, pos, extra, cfg.train.keep_last),
        preemption=preemption)
    if preempted:
        if s.rank == 0:
            print(f"[lorasb] stopped by a signal at step {position.step}; checkpoint written, "
                  f"resume with --resume auto")
        logger.close()
        dist.barrier()
        raise SystemExit(EXIT_PREEMPTED)

    # ---- the adapter and the summary (train.keep_best: from the checkpoint of the best validation loss)
    if cfg.train.keep_best and position.best_step not in (None, position.step):
        checkpoint.load(s.engine, checkpoint.checkpoint_path(out_dir, position.best_step))
    estimated_by_this_run = METHODS[cfg.lorasb.method].estimates and is_own_init_file(init_path, out_dir)
    summary = {
        "method": cfg.lorasb.method, "steps": position.step, "world_size": s.world,
        "global_batch": prepared.layout.global_batch,
        # the run's history, across resumes: B and A estimated by this run (now or before a resume)?
        "estimated": estimated_by_this_run,
        "estimation_seconds": init_meta.get("estimation_seconds") if estimated_by_this_run else None,
        "resumed_from": prepared.resume_from, "resumed_at_step": start_step if prepared.resume_from else None,
        "init_id": init_meta.get("init_id"), "lr_eff": init_meta.get("lr_eff"),
        "final_loss": logger.last_loss, "stopped_early": position.step < prepared.schedule.total_steps,
        "best_eval_loss": position.best_eval_loss,
        "adapter_step": position.best_step if cfg.train.keep_best and position.best_step else position.step,
        "trainable_parameters": s.counts.trainable, "frozen_adapter_parameters": s.counts.adapter_frozen,
        "base_parameters": s.counts.base, "truncated_samples": prepared.truncated,
    }
    finish(s, init_path, init_meta, summary)
    logger.close()
    dist.barrier()
    return summary


def build(p: Prepared) -> Session:
    """Start the process group, load the model, wrap the targets, build the engine. Collective."""
    import deepspeed

    from .ranks import init_distributed

    cfg, ds_config = p.cfg, p.ds_config
    rank, world, device = init_distributed(cfg.train.dist_timeout_minutes)
    if world != p.layout.world_size:  # an MPI launch announces its size only now
        layout = resolve_batch_layout(ds_config, world)
        p = replace(p, layout=layout, schedule=make_schedule(cfg, len(p.examples), layout.micro_batch,
                                                             layout.grad_accum, world))
    layout, schedule = p.layout, p.schedule
    os.makedirs(cfg.train.output_dir, exist_ok=True)  # on every rank: nodes need not share a filesystem
    if rank == 0:
        write_run_config(cfg.train.output_dir, cfg.to_dict(), ds_config)
    deepspeed.runtime.utils.set_random_seed(cfg.train.seed)

    # ---- model, surgery, engine (the optimizer sees the trained tensors only: LoRA-SB's R matrices)
    model = load_model(cfg.model, ds_config, model_dtype(ds_config), num_labels_of(cfg))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = wrap_targets(model, cfg.lorasb.target_modules, cfg.lorasb.r, cfg.lorasb.dropout, cfg.lorasb.method,
                          cfg.lorasb.fuse_projections)
    saved = [] if not METHODS[cfg.lorasb.method].wraps else modules_to_save(model, cfg.lorasb.modules_to_save,
                                                                    cfg.model.task)
    train_modules(model, saved)
    counts = count_parameters(model, layers)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    t = cfg.train
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=list(trained.values()),
        optimizer=lambda params: torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                                   weight_decay=t.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(t.schedule, schedule.warmup_steps, schedule.total_steps)),
        config=ds_config,
    )
    if rank == 0:
        print(f"[lorasb] world {world}, micro-batch {layout.micro_batch} x accumulation "
              f"{layout.grad_accum} -> global batch {layout.global_batch}; {len(p.examples)} samples "
              f"({p.truncated} truncated); {schedule.total_steps} steps, warm-up {schedule.warmup_steps}"
              + ("" if "train_batch_size" in ds_config else
                 " (the ds_config sets no train_batch_size: the global batch follows the number of ranks)"))
        print(f"[lorasb] method {cfg.lorasb.method}, {len(layers)} adapter layers, r={cfg.lorasb.r}: "
              f"{counts.describe()}")
    return Session(prepared=p, engine=engine, lr_scheduler=lr_scheduler, layers=layers, trained=trained,
                   modules_to_save=saved, counts=counts, rank=rank, world=world, device=device,
                   owners=assign_owners(layer_shapes(layers), world))


def train_loop(s: Session, logger: Logger, position: Position | None = None,
               save=None, preemption: PreemptionFlag | None = None) -> tuple[Position, bool]:
    """The optimizer steps over the R matrices, from ``position`` to the schedule's last step.

    ``save(position)`` is called every ``train.save_every`` steps, at the end and on preemption.
    Returns the final position and whether the run stopped early for preemption.
    """
    engine, t, p = s.engine, s.prepared.cfg.train, s.prepared
    total_steps = p.schedule.total_steps
    trained = list(s.trained.values())
    pos = position or Position()
    engine.train()
    losses = []
    bar = tqdm(total=total_steps, initial=pos.step, desc="train", disable=s.rank != 0)
    while pos.step < total_steps:
        epoch_batches = train_batches(len(p.examples), p.layout.micro_batch, s.rank, s.world, pos.epoch, t.seed)
        for i in range(pos.micro_batch, len(epoch_batches)):
            # ---- forward, backward, step: DeepSpeed accumulates until the boundary, then steps R
            batch = collate([p.examples[k] for k in epoch_batches[i]], p.tokenizer.pad_token_id)
            boundary = engine.is_gradient_accumulation_boundary()  # of this micro-batch
            lr = s.lr_scheduler.get_last_lr()[0]  # the rate this step uses
            loss = engine(**{k: v.to(s.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            if not boundary:
                continue
            pos.step += 1
            pos.micro_batch = i + 1
            bar.update(1)
            last = pos.step == total_steps

            # ---- log: the step's loss averaged over ranks, and the norms
            norm = None  # of the trained tensors, gathered at most once per step
            if pos.step % t.log_every == 0 or last:
                norm = param_norm(trained)
                mean_loss = torch.stack(losses).mean().to(s.device)
                dist.all_reduce(mean_loss)
                grad_norm = engine.get_global_grad_norm()
                record = {"step": pos.step, "loss": mean_loss.item() / s.world, "lr": lr,
                          "grad_norm": None if grad_norm is None else float(grad_norm), "param_norm": norm}
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                logger.log(record, tb={f"Train/{k}": v for k, v in record.items() if k != "step"})

            # ---- validate on the held-out set; its loss is the same on every rank, so is early stopping
            best = False  # a new best validation loss at this step
            if p.eval_examples and (last or (t.eval_every and pos.step % t.eval_every == 0)):
                validate(s, pos, logger)
                best = pos.evals_since_best == 0
                last = last or bool(t.early_stopping_patience and pos.evals_since_best >= t.early_stopping_patience)
            if best and t.keep_best:
                pos.best_step = pos.step

            # ---- agree on stopping (a signal) or failing (NaN), then checkpoint if due
            finite = bool(torch.isfinite(torch.stack(losses)).all())
            losses = []
            stop, diverged = any_rank([preemption is not None and preemption.requested, not finite], s.device)
            saving = save is not None and (stop or last or (best and t.keep_best)
                                           or (t.save_every and pos.step % t.save_every == 0))
            if saving and not diverged:  # a checkpoint is written only with finite R (same on all ranks)
                diverged = not math.isfinite(norm if norm is not None else param_norm(trained))
            if diverged:
                raise FloatingPointError(
                    f"the loss or R is NaN or inf at step {pos.step}; stopped without writing a checkpoint. "
                    "Lower train.lr (or check the data), then --resume auto from the last good checkpoint")
            if saving:
                save(pos)
            if stop or last:
                bar.close()
                return pos, stop
        pos.epoch, pos.micro_batch = pos.epoch + 1, 0
    bar.close()
    return pos, False


def validate(s: Session, pos: Position, logger: Logger) -> None:
    """The validation loss at this step: logged, and the best one and the validations since it kept in
    ``pos`` (so a resumed run stops early at the same step). Collective."""
    loss = validation_loss(s)
    if pos.best_eval_loss is None or loss < pos.best_eval_loss:
        pos.best_eval_loss, pos.evals_since_best = loss, 0
    else:
        pos.evals_since_best += 1
    if s.rank == 0:
        tqdm.write(f"[lorasb] step {pos.step}: validation loss {loss:.4f} (best {pos.best_eval_loss:.4f})")
    logger.log({"event": "eval", "step": pos.step, "eval_loss": loss, "best_eval_loss": pos.best_eval_loss,
                "evals_since_best": pos.evals_since_best}, tb={"Eval/loss": loss})


@torch.no_grad()
def validation_loss(s: Session) -> float:
    """Mean loss per target token over the held-out set (per example for a classifier), over all ranks.

    Collective: every rank runs the same number of forward passes (a rank short of examples repeats
    example 0 at weight 0), as ZeRO-3 gathers the weights in each."""
    p = s.prepared
    s.engine.eval()  # no dropout
    total = torch.zeros(2, dtype=torch.float64)
    for idx in eval_batches(len(p.eval_examples), p.layout.micro_batch, s.rank, s.world):
        batch = collate([p.eval_examples[k] for k in idx or [0]], p.tokenizer.pad_token_id)
        loss = s.engine(**{k: v.to(s.device) for k, v in batch.items()}).loss
        labels = batch["labels"]  # the loss is a mean over target tokens (labels shifted by one) or examples
        count = len(labels) if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())
        weight = count if idx else 0
        total += torch.tensor([float(loss) * weight, weight], dtype=torch.float64)
    total = total.to(s.device)
    dist.all_reduce(total)
    s.engine.train()
    return float(total[0] / total[1])


def finish(s: Session, init_path: str, init_meta: dict, summary: dict) -> None:
    """Write the adapter (the trained tensors' fp32 masters + the init file) and the run summary.
    Collective: every rank gathers; rank 0 writes."""
    from deepspeed.utils import safe_get_full_fp32_param

    final = {}
    for name, p in s.trained.items():
        full = safe_get_full_fp32_param(p).detach().float().cpu()
        if s.rank == 0:
            final[name] = full.reshape(getattr(p, "ds_shape", p.shape))
    if s.rank == 0:
        out_dir = s.prepared.cfg.train.output_dir
        adapter_dir = os.path.join(out_dir, ADAPTER_DIR_NAME)
        data = s.prepared.cfg.data
        training = {"data": f"{data.path or 'built-in arithmetic problems'} ({data.format}, {len(s.prepared.examples)} "
                            f"samples)", **{k: summary[k] for k in ("steps", "global_batch", "trainable_parameters",
                                                                     "final_loss", "best_eval_loss", "stopped_early")}}
        save_adapter(adapter_dir, final, init_path, dict(init_meta, modules_to_save=s.modules_to_save,
                                                         training=training))
        write_run_summary(out_dir, summary)
        print(f"[lorasb] adapter written to {adapter_dir}")


def param_norm(params: list[torch.nn.Parameter]) -> float:
    """Frobenius norm of all the tensors together; gathers them one by one under ZeRO-3 (collective)."""
    import deepspeed

    total = 0.0
    for p in params:
        with deepspeed.zero.GatheredParameters([p]):
            total += float(p.detach().float().square().sum())
    return math.sqrt(total)
