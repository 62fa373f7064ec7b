"""One LoRA-SB training run around a single DeepSpeed engine.

    check configs -> process group -> data -> model -> wrap targets -> deepspeed.initialize(R only)
      -> estimation pass + owner SVDs + broadcast   (or: read the init file)
      -> for batch: loss = engine(**batch).loss; engine.backward(loss); engine.step()
      -> save the adapter (R per module + the init file)

The baselines ``lorasb.method: loraxs | lora | full`` run through the same steps: only the adapter's
initialization (``init_adapters``) and which tensors are trained differ.

Every rank runs this whole function; rank 0 alone writes files and logs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__, checkpoint
from .checkpoint import Position
from .config import (BatchLayout, ConfigError, RunConfig, check_precision, precision,
                     resolve_batch_layout)
from .data import (collate, describe_truncation, estimation_indices, fingerprint, load_rows, tokenize_rows,
                   train_batches)
from .estimate import (EstimationStats, assign_owners, check_finite, estimate_gradients, estimation_groups,
                       layer_shapes, max_accum_bytes, weighted_estimation_batches)
from .export import INIT_FILE_NAME, save_adapter
from .files import atomic_write_text
from .init import (LayerInit, apply_inits, broadcast_inits, check_init_metadata, init_from_gradient,
                   init_from_weight, load_init_file, lora_init, new_init_id, read_init_metadata,
                   save_init_file)
from .layer import LoRASBLinear, shape_of
from .modeling import (auto_class, builtin_name, check_model_source, load_model, load_tokenizer,
                       tiny_llama_config, tiny_roberta_config)
from .surgery import ParameterCounts, count_parameters, find_targets, modules_to_save, train_modules, wrap_targets



def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of train.lr at optimizer step k (0-based): linear warm-up to 1, then decay to 0."""

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def model_dtype(ds_config: dict) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(ds_config)]


def check_targets_without_weights(cfg: RunConfig, world: int) -> None:
    """Fail on bad targets, rank, modules to save or accumulator budget from the model's config alone,
    before any weight is loaded."""
    if cfg.lorasb.method == "full":
        return
    with torch.device("meta"):
        skeleton = auto_class(cfg.model.task).from_config(model_config_of(cfg),
                                                          trust_remote_code=cfg.model.trust_remote_code)
    found = find_targets(skeleton, cfg.lorasb.target_modules, cfg.lorasb.r)
    modules_to_save(skeleton, cfg.lorasb.modules_to_save, cfg.model.task)
    if cfg.lorasb.method == "lorasb":
        shapes = {name: shape_of(module) for name, module in found}
        estimation_groups(shapes, assign_owners(shapes, world), max_accum_bytes(cfg.lorasb))


def num_labels_of(cfg: RunConfig) -> int | None:
    """Outputs of the classification head (``model.task: seq_cls``): from the GLUE task."""
    from .glue import task_of

    return task_of(cfg.data.glue_task).num_labels if cfg.model.task == "seq_cls" else None


@dataclass
class Plan:
    """Step counts, derived once from the data and the batch layout (identical on every rank)."""

    micro_batches_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr_eff: float


def make_plan(cfg: RunConfig, num_examples: int, micro_batch: int, grad_accum: int, world: int) -> Plan:
    per_epoch = len(train_batches(num_examples, micro_batch, 0, world, 0, cfg.train.seed))
    steps_per_epoch = per_epoch // grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the data gives {per_epoch} micro-batches per rank per epoch, fewer than "
                          f"gradient_accumulation_steps = {grad_accum}; use more data or smaller batches")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = max(1, math.ceil(cfg.train.warmup_ratio * total))
    lr_eff = cfg.lorasb.lr_eff or cfg.train.lr / warmup
    return Plan(per_epoch, total, warmup, lr_eff)


def init_metadata(cfg: RunConfig) -> dict:
    """What an init file must agree on with the run that reuses it."""
    return {"model": cfg.model.name_or_path or builtin_name(cfg.model.task), "method": cfg.lorasb.method,
            "task": cfg.model.task,
            "target_modules": list(cfg.lorasb.target_modules), "r": cfg.lorasb.r}


class Logger:
    """Rank 0 writes metrics to ``metrics.jsonl`` and to TensorBoard through ``engine.monitor``.

    ``resume_step``: a resumed run continues its own log from that step. Records of later steps (written
    after the checkpoint, before the run stopped) are dropped from ``metrics.jsonl``, and TensorBoard is
    told to purge its points past the checkpoint (a ``SessionLog.START`` event, as ``SummaryWriter``'s
    ``purge_step`` writes one), so that each step appears once in both."""

    def __init__(self, engine, output_dir: str, rank: int, resume_step: int | None = None):
        self.engine, self.rank = engine, rank
        self.file = None
        if rank != 0:
            return
        path = os.path.join(output_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.isfile(path):
            kept = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text("".join(kept), path)
        self.file = open(path, "a")
        writer = getattr(getattr(engine.monitor, "tb_monitor", None), "summary_writer", None)
        if resume_step is not None and writer is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            # TensorBoard keeps the points before this step, of every file in the folder, and drops the rest
            writer.file_writer.add_event(Event(step=engine.global_samples + 1,
                                               session_log=SessionLog(status=SessionLog.START)))

    def log(self, record: dict, tb: dict[str, float] | None = None) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if tb:
            samples = self.engine.global_samples
            self.engine.monitor.write_events([(tag, value, samples) for tag, value in tb.items()])

    def close(self) -> None:
        if self.file:
            self.file.close()


@dataclass
class Session:
    """Everything a run holds after set-up; the same fields on every rank."""

    cfg: RunConfig
    engine: object
    scheduler: object
    layers: dict[str, LoRASBLinear]
    trained: dict[str, torch.nn.Parameter]
    """Every parameter the optimizer holds, by its name in the model (LoRA-SB: ``<module>.lora_R``)."""
    modules_to_save: list[str]
    """Modules trained in full beside the adapter (a classifier's head)."""
    counts: ParameterCounts
    tokenizer: object
    examples: list[dict]
    truncated: int
    layout: BatchLayout
    plan: Plan
    rank: int
    world: int
    device: torch.device
    owners: dict[str, int]
    data_fingerprint: str | None


@dataclass
class Prepared:
    """The outcome of the checks: everything decided before any heavy work (no process group yet,
    no model). The same on every rank."""

    cfg: RunConfig
    ds_config: dict
    layout: BatchLayout
    tokenizer: object
    examples: list[dict]
    truncated: int
    plan: Plan
    data_fingerprint: str | None
    resume_from: str | None
    marker: dict | None


def prepare(cfg: RunConfig, ds_config: dict) -> Prepared:
    """Every check of configs, data, targets, init file and checkpoint; raises ConfigError."""
    from deepspeed.accelerator import get_accelerator

    from .dist import world_size_from_env

    check_output_dir(cfg)
    resume_from, marker = resume_point(cfg)
    if cfg.train.resume and os.environ.get("RANK", "0") == "0":  # say what --resume found, either way
        print(f"[lorasb] --resume {cfg.train.resume}: " + (
            f"continuing from {resume_from} (step {marker['step']})" if marker is not None else
            f"no complete checkpoint in {cfg.train.output_dir}; starting a new run"))
    init_file = cfg.train.init_file
    if marker is not None:  # B and A come from the run's own init file: never estimated again
        init_file = marker["init_file"]
    elif cfg.train.resume and os.path.isfile(os.path.join(cfg.train.output_dir, INIT_FILE_NAME)):
        init_file = os.path.join(cfg.train.output_dir, INIT_FILE_NAME)  # killed before its first checkpoint
    cfg.train.init_file = init_file
    check_model_source(cfg.model)
    layout = resolve_batch_layout(ds_config, world_size_from_env())
    check_precision(ds_config, get_accelerator().device_name())
    check_targets_without_weights(cfg, layout.world_size)
    tokenizer = load_tokenizer(cfg.model)
    rows = load_rows(cfg.data, cfg.train.seed)
    examples, truncated = tokenize_rows(rows, tokenizer, cfg.data)
    if os.environ.get("RANK", "0") == "0":
        print(f"[lorasb] data: {describe_truncation(truncated, cfg.data.max_length, len(rows), len(examples))}")
    plan = make_plan(cfg, len(examples), layout.micro_batch, layout.grad_accum, layout.world_size)
    data_fingerprint = None  # of the estimation data: needed to estimate, or to check a resume
    if cfg.lorasb.method == "lorasb" and (not init_file or cfg.train.resume):
        data_fingerprint = fingerprint(
            examples, estimation_indices(cfg.lorasb.est_samples, len(examples), cfg.train.seed))
    if init_file:
        meta = read_init_metadata(init_file)
        check_init_metadata(init_file, meta, init_metadata(cfg))
        if marker is not None and meta.get("init_id") != marker["init_id"]:
            raise ConfigError(f"--resume {resume_from}: its init file {init_file} was replaced since; "
                              "restore it or start a new run")
        estimated_here = os.path.abspath(init_file) == os.path.abspath(
            os.path.join(cfg.train.output_dir, INIT_FILE_NAME))
        if cfg.train.resume and estimated_here and meta.get("data_fingerprint") != data_fingerprint:
            raise ConfigError(f"--resume: the estimation data differ from those that made {init_file} "
                              "(the data file changed?); resume with the original data or start a new run")
    tb = ds_config.get("tensorboard")
    if tb and tb.get("enabled") and not tb.get("output_path"):
        output_path = os.path.join(cfg.train.output_dir, "tensorboard")
        ds_config = dict(ds_config, tensorboard=dict(tb, output_path=output_path))
    return Prepared(cfg, ds_config, layout, tokenizer, examples, truncated, plan, data_fingerprint,
                    resume_from, marker)


def setup(cfg: RunConfig, ds_config: dict) -> Session:
    """``build(prepare(cfg, ds_config))``: check everything, then the heavy work."""
    return build(prepare(cfg, ds_config))


def build(p: Prepared) -> Session:
    """Start the process group, load the model, wrap the targets, build the engine."""
    import deepspeed

    from .dist import init_distributed

    cfg, ds_config, layout, plan, examples = p.cfg, p.ds_config, p.layout, p.plan, p.examples
    out_dir = cfg.train.output_dir
    rank, world, device = init_distributed(cfg.train.dist_timeout_minutes)
    if world != layout.world_size:  # an MPI launch announces its size only now
        layout = resolve_batch_layout(ds_config, world)
        plan = make_plan(cfg, len(examples), layout.micro_batch, layout.grad_accum, world)
    os.makedirs(out_dir, exist_ok=True)  # on every rank: nodes need not share a filesystem
    if rank == 0:
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump({"run": cfg.to_dict(), "deepspeed": ds_config}, f, indent=2)
    deepspeed.runtime.utils.set_random_seed(cfg.train.seed)

    # ---- model, surgery, engine (the optimizer sees the trained tensors only: LoRA-SB's R matrices)
    model = load_model(cfg.model, ds_config, model_dtype(ds_config), num_labels_of(cfg))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = wrap_targets(model, cfg.lorasb.target_modules, cfg.lorasb.r, cfg.lorasb.dropout, cfg.lorasb.method)
    saved = [] if cfg.lorasb.method == "full" else modules_to_save(model, cfg.lorasb.modules_to_save,
                                                                    cfg.model.task)
    train_modules(model, saved)
    counts = count_parameters(model, layers)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    t = cfg.train
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=list(trained.values()),
        optimizer=lambda params: torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                                   weight_decay=t.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(t.schedule, plan.warmup_steps, plan.total_steps)),
        config=ds_config,
    )
    if rank == 0:
        print(f"[lorasb] world {world}, micro-batch {layout.micro_batch} x accumulation "
              f"{layout.grad_accum} -> global batch {layout.global_batch}; {len(examples)} samples "
              f"({p.truncated} truncated); {plan.total_steps} steps, warm-up {plan.warmup_steps}"
              + ("" if "train_batch_size" in ds_config else
                 " (the ds_config sets no train_batch_size: the global batch follows the number of ranks)"))
        print(f"[lorasb] method {cfg.lorasb.method}, {len(layers)} adapter layers, r={cfg.lorasb.r}: "
              f"{counts.describe()}")
    return Session(cfg, engine, scheduler, layers, trained, saved, counts, p.tokenizer, examples, p.truncated, layout, plan,
                   rank, world, device, assign_owners(layer_shapes(layers), world), p.data_fingerprint)


def init_adapters(s: Session) -> tuple[dict[str, LayerInit], dict, EstimationStats | None]:
    """Initial B, A, R of every layer as ``lorasb.method`` says; rank 0 writes the init file. Collective.

    Each module's owner computes its init (``lorasb``: estimation pass, then the SVD of the update;
    ``loraxs``: the SVD of W0, gathered on every rank in turn; ``lora``: seeded), then every init is
    broadcast from its owner. ``full`` has no layers: its init file holds metadata only.
    """
    import deepspeed

    cfg, method = s.cfg, s.cfg.lorasb.method
    index = {name: i for i, name in enumerate(s.layers)}  # a per-module seed, owner-independent
    mine = [name for name in s.layers if s.owners[name] == s.rank]
    stats = None
    local: dict[str, LayerInit] = {}
    init_seconds = 0.0
    if method == "lorasb":  # group by group: estimate G (collective), then the owners' SVDs free it
        batches = weighted_estimation_batches(s.examples, cfg.lorasb.est_samples, cfg.lorasb.est_micro_batch,
                                              s.rank, s.world, cfg.train.seed, s.tokenizer.pad_token_id)
        for group in estimation_groups(layer_shapes(s.layers), s.owners, max_accum_bytes(cfg.lorasb)):
            layers = {name: s.layers[name] for name in group}
            grads, group_stats = estimate_gradients(s.engine.module, layers, batches, s.owners, s.device)
            stats = group_stats if stats is None else stats.add(group_stats)
            check_finite(grads, group, s.device)
            t0 = time.perf_counter()
            for name in group:
                if name in mine:
                    local[name] = init_from_gradient(grads.pop(name), cfg.lorasb, s.plan.lr_eff,
                                                     cfg.train.seed + index[name])
            init_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, layer in s.layers.items():
        seed = cfg.train.seed + index[name]
        if method == "loraxs":
            with deepspeed.zero.GatheredParameters([layer.base.weight]):  # every rank, every module
                W0 = layer.base.weight.detach().float().clone() if name in mine else None
            if W0 is not None:
                local[name] = init_from_weight(W0, cfg.lorasb, seed)
        elif method == "lora" and name in mine:
            local[name] = lora_init(layer.out_features, layer.in_features, cfg.lorasb, seed)
    init_seconds += time.perf_counter() - t0
    inits = broadcast_inits(s.layers, local, s.owners, s.device)
    meta = dict(init_metadata(cfg), init_id=new_init_id(), seed=cfg.train.seed, world_size=s.world,
                owners=s.owners, versions=_versions())
    if method == "lorasb":
        meta.update(update=cfg.lorasb.update, lr_eff=s.plan.lr_eff, est_samples=cfg.lorasb.est_samples,
                    est_micro_batch=cfg.lorasb.est_micro_batch, data_fingerprint=s.data_fingerprint,
                    estimation_seconds=round(stats.seconds, 3) if stats else None)
    if method in ("lorasb", "loraxs"):
        meta.update(svd=cfg.lorasb.svd, svd_oversample=cfg.lorasb.svd_oversample, svd_niter=cfg.lorasb.svd_niter,
                    svd_tol=cfg.lorasb.svd_tol, svd_max_iter=cfg.lorasb.svd_max_iter)
    if method == "lora":
        meta.update(lora_alpha=cfg.lorasb.lora_alpha if cfg.lorasb.lora_alpha is not None else 2 * cfg.lorasb.r)
    if s.rank == 0:
        save_init_file(os.path.join(cfg.train.output_dir, INIT_FILE_NAME), inits, meta)
        if stats is not None:
            passes = f" ({stats.passes} passes)" if stats.passes > 1 else ""
            print(f"[lorasb] estimation: {stats.micro_batches_per_rank} micro-batches per rank{passes} in "
                  f"{stats.seconds:.2f}s, lr_eff {s.plan.lr_eff:.3g}")
        print(f"[lorasb] {method} init of {len(inits)} layers: {init_seconds:.2f}s on rank 0")
        if method in ("lorasb", "loraxs") and inits:
            energies, iterations = [i.energy for i in inits.values()], [i.svd_iterations for i in inits.values()]
            print(f"[lorasb] SVD ({cfg.lorasb.svd}): captured energy min {min(energies):.3f} mean "
                  f"{sum(energies) / len(energies):.3f}; iterations max {max(iterations)}")
    return inits, meta, stats


EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (resume with --resume auto)."""


class PreemptionFlag:
    """SIGTERM or SIGUSR1 (sent by Slurm before a time limit or preemption) ask the run to stop.

    The handler only sets a flag; at each optimizer-step boundary every rank all-reduces it (see
    ``any_rank``), so all ranks agree to stop at the same step, checkpoint together and exit.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True



def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank (one all-reduce; every rank must call it)."""
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def train_loop(s: Session, logger: Logger, position: Position | None = None,
               save=None, preemption: PreemptionFlag | None = None) -> tuple[Position, bool]:
    """The optimizer steps over the R matrices, from ``position`` to the plan's last step.

    ``save(position)`` is called every ``train.save_every`` steps, at the end and on preemption.
    Returns the final position and whether the run stopped early for preemption.
    """
    engine, t = s.engine, s.cfg.train
    trained = list(s.trained.values())
    pos = position or Position()
    engine.train()
    losses = []
    bar = tqdm(total=s.plan.total_steps, initial=pos.step, desc="train", disable=s.rank != 0)
    while pos.step < s.plan.total_steps:
        epoch_batches = train_batches(len(s.examples), s.layout.micro_batch, s.rank, s.world, pos.epoch,
                                      t.seed)
        for i in range(pos.micro_batch, len(epoch_batches)):
            batch = collate([s.examples[k] for k in epoch_batches[i]], s.tokenizer.pad_token_id)
            boundary = engine.is_gradient_accumulation_boundary()  # of this micro-batch
            lr = s.scheduler.get_last_lr()[0]  # the rate this step uses
            loss = engine(**{k: v.to(s.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # an optimizer step at the boundary, gradient accumulation otherwise
            losses.append(loss.detach().float())
            if not boundary:
                continue
            pos.step += 1
            pos.micro_batch = i + 1
            bar.update(1)
            last = pos.step == s.plan.total_steps
            norm = None  # of the trained tensors, gathered at most once per step
            if pos.step % t.log_every == 0 or last:
                norm = param_norm(trained)
                mean_loss = torch.stack(losses).mean().to(s.device)
                dist.all_reduce(mean_loss)
                record = {"step": pos.step, "loss": mean_loss.item() / s.world, "lr": lr,
                          "grad_norm": _to_float(engine.get_global_grad_norm()),
                          "param_norm": norm}
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                logger.log(record, tb={f"Train/{k}": v for k, v in record.items() if k != "step"})
            finite = bool(torch.isfinite(torch.stack(losses)).all())
            losses = []
            stop, diverged = any_rank([preemption is not None and preemption.requested, not finite], s.device)
            saving = save is not None and (stop or last or (t.save_every and pos.step % t.save_every == 0))
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


def check_output_dir(cfg: RunConfig) -> None:
    """The output directory must be writable and must not hold another run (unless told). Nothing is
    created here: a refused run leaves no folder behind (rank 0 creates it once the checks pass)."""
    out = cfg.train.output_dir
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest ancestor that exists is where the folder will go
        existing = os.path.dirname(existing)
    why = None
    if not os.path.isdir(existing):
        why = f"'{existing}' is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no write permission on '{existing}'"
    if why:
        raise ConfigError(f"train.output_dir '{out}' is not writable ({why}); choose another")
    if os.path.exists(os.path.join(out, "run_config.json")) and not (cfg.train.resume or cfg.train.overwrite):
        raise ConfigError(f"train.output_dir '{out}' already holds a run; continue it with --resume auto, "
                          "start over with --overwrite, or choose another directory")


def resume_point(cfg: RunConfig) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its marker, checked against this run's configuration."""
    if not cfg.train.resume:
        return None, None
    path = checkpoint.resolve_resume(cfg.train.resume, cfg.train.output_dir)
    if path is None:
        return None, None
    marker = checkpoint.read_marker(path)
    mine = run_identity(cfg)
    for section, values in marker["run"].items():
        for key, value in values.items():
            if mine[section].get(key) != value:
                raise ConfigError(
                    f"--resume {path}: the checkpoint was made with {section}.{key} = {value!r}, this run "
                    f"has {mine[section].get(key)!r}; resume with the same settings or start a new run")
    if not os.path.isfile(marker["init_file"]):
        raise ConfigError(f"--resume {path}: its init file {marker['init_file']} is missing")
    return path, marker


def run_identity(cfg: RunConfig) -> dict:
    """The settings a checkpoint must agree on with the run that resumes it."""
    d = cfg.to_dict()
    train = {k: d["train"][k] for k in ("lr", "weight_decay", "betas", "eps", "warmup_ratio", "schedule",
                                        "epochs", "max_steps", "seed")}
    train["betas"] = list(train["betas"])
    return {"model": d["model"], "lorasb": d["lorasb"], "data": d["data"], "train": train}


def dry_run(p: Prepared) -> dict:
    """Print what a run would do (layout, steps, memory per rank) after every check; start nothing."""
    from .dist import first_to_say
    from .plan import format_plan, plan_memory

    cfg, layout = p.cfg, p.layout
    summary = {"dry_run": True, "method": cfg.lorasb.method, "world_size": layout.world_size,
               "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
               "global_batch": layout.global_batch, "samples": len(p.examples), "truncated": p.truncated,
               "steps": p.plan.total_steps, "warmup_steps": p.plan.warmup_steps, "lr_eff": p.plan.lr_eff,
               "init_file": cfg.train.init_file, "resume_from": p.resume_from}
    text = json.dumps(summary, indent=2)
    if cfg.lorasb.method != "lorasb":
        text += f"\n[lorasb] the memory plan models lorasb.method=lorasb only; not printed for {cfg.lorasb.method}"
    zero = p.ds_config.get("zero_optimization", {})
    buckets = {k: zero[k] for k in ("reduce_bucket_size", "prefetch_bucket_size") if k in zero}
    if "stage3_prefetch_bucket_size" in zero:
        buckets["prefetch_bucket_size"] = zero["stage3_prefetch_bucket_size"]
    if cfg.lorasb.method == "lorasb":
        layer_plan = plan_memory(model_config_of(cfg), cfg.lorasb.r, cfg.lorasb.target_modules, layout.world_size,
                                 layout.micro_batch, cfg.data.max_length, precision(p.ds_config),
                                 bool(zero.get("offload_param")), cfg.model.gradient_checkpointing,
                                 cfg.lorasb.est_micro_batch, **buckets, est_max_accum_gb=cfg.lorasb.est_max_accum_gb)
        text += "\n" + format_plan(layer_plan)
    if first_to_say(text):  # every rank computed the same plan: print it once
        print(text, flush=True)
    return summary


def model_config_of(cfg: RunConfig):
    """The model's configuration alone (no weights): the tiny default's or the checkpoint's."""
    from transformers import AutoConfig

    if not cfg.model.name_or_path:
        return tiny_roberta_config(num_labels_of(cfg)) if cfg.model.task == "seq_cls" else tiny_llama_config()
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.task == "seq_cls":
        config.num_labels = num_labels_of(cfg)
        config.problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
    return config


def run(cfg: RunConfig, ds_config: dict, dry: bool = False) -> dict:
    """The whole run; returns its summary (also written to ``run_summary.json`` by rank 0).

    ``dry``: stop after the checks and print the resolved layout and plan (``--dry_run``)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out_dir = cfg.train.output_dir
    prepared = prepare(cfg, ds_config)
    if dry:
        return dry_run(prepared)
    resume_from = prepared.resume_from
    preemption = PreemptionFlag()
    s = build(prepared)

    # ---- B, A, R: from the init file, or estimated now
    est_stats = None
    if cfg.train.init_file:
        inits, init_meta = load_init_file(cfg.train.init_file, s.layers)  # checked in prepare()
        init_path = cfg.train.init_file
    else:
        inits, init_meta, est_stats = init_adapters(s)
        init_path = os.path.join(out_dir, INIT_FILE_NAME)
    apply_inits(s.layers, inits)
    position = checkpoint.Position()
    if resume_from:
        position, _ = checkpoint.load(s.engine, resume_from)

    # ---- the log: a resumed run continues its own from the checkpoint's step, each step once
    logger = Logger(s.engine, out_dir, s.rank, resume_step=position.step if cfg.train.resume else None)
    energies = {name: init.energy for name, init in inits.items()}
    iterations = {name: init.svd_iterations for name, init in inits.items()}
    logger.log({"event": "init", "estimated": est_stats is not None, "init_file": init_path,
                "resumed_from": resume_from, "start_step": position.step, "lr_eff": init_meta.get("lr_eff"),
                "mean_energy": sum(energies.values()) / max(1, len(energies)),
                "max_svd_iterations": max(iterations.values(), default=0)},
               tb=None if resume_from else {**{f"Estimation/energy/{n}": e for n, e in energies.items()},
                                            **{f"Estimation/svd_iterations/{n}": k for n, k in iterations.items()}})
    start_step = position.step

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

    # ---- the adapter: the trained tensors (fp32 masters; gathered, so every rank takes part) + the init file
    final = {}
    for name, p in s.trained.items():
        full = safe_get_full_fp32_param(p).detach().float().cpu()
        if s.rank == 0:
            final[name] = full.reshape(getattr(p, "ds_shape", p.shape))
    estimated_by_this_run = cfg.lorasb.method == "lorasb" and (
        os.path.abspath(init_path) == os.path.abspath(os.path.join(out_dir, INIT_FILE_NAME)))
    summary = {
        "method": cfg.lorasb.method, "steps": position.step, "world_size": s.world, "global_batch": s.layout.global_batch,
        # the run's history, across resumes: B and A estimated by this run (now or before a resume)?
        "estimated": estimated_by_this_run,
        "estimation_seconds": init_meta.get("estimation_seconds") if estimated_by_this_run else None,
        "resumed_from": resume_from, "resumed_at_step": start_step if resume_from else None,
        "init_id": init_meta.get("init_id"), "lr_eff": init_meta.get("lr_eff"),
        "trainable_parameters": s.counts.trainable, "frozen_adapter_parameters": s.counts.adapter_frozen,
        "base_parameters": s.counts.base, "truncated_samples": s.truncated,
    }
    if s.rank == 0:
        adapter_dir = os.path.join(out_dir, "adapter")
        save_adapter(adapter_dir, final, init_path, dict(init_meta, modules_to_save=s.modules_to_save))
        with open(os.path.join(out_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"[lorasb] adapter written to {adapter_dir}")
    logger.close()
    dist.barrier()
    return summary


def param_norm(params: list[torch.nn.Parameter]) -> float:
    """Frobenius norm of all the tensors together; gathers them one by one under ZeRO-3 (collective)."""
    import deepspeed

    total = 0.0
    for p in params:
        with deepspeed.zero.GatheredParameters([p]):
            total += float(p.detach().float().square().sum())
    return math.sqrt(total)


def _to_float(x) -> float | None:
    return None if x is None else float(x)


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {"lorasb_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}
