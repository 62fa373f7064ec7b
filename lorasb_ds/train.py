"""One LoRA-SB training run around a single DeepSpeed engine.

    check configs -> process group -> data -> model -> wrap targets -> deepspeed.initialize(R only)
      -> estimation pass + owner SVDs + broadcast   (or: read the init file)
      -> for batch: loss = engine(**batch).loss; engine.backward(loss); engine.step()
      -> save the adapter (R per module + the init file)

Every rank runs this whole function; rank 0 alone writes files and logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from . import __version__
from .config import ConfigError, RunConfig, check_precision, resolve_batch_layout
from .data import collate, estimation_batches, load_rows, tokenize_rows, train_batches
from .estimate import assign_owners, estimate_gradients
from .init import (apply_inits, broadcast_inits, check_init_metadata, init_from_gradient,
                   load_init_file, new_init_id, save_init_file)
from .modeling import check_model_source, load_model, load_tokenizer, tiny_llama_config
from .surgery import count_parameters, find_targets, wrap_targets

INIT_FILE_NAME = "lorasb_init.safetensors"
ADAPTER_FILE_NAME = "lorasb_adapter.safetensors"


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
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def check_targets_without_weights(cfg: RunConfig) -> None:
    """Fail on bad targets or rank from the model's config alone, before any weight is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model.name_or_path:
        model_config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    else:
        model_config = tiny_llama_config()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config,
                                                    trust_remote_code=cfg.model.trust_remote_code)
    find_targets(skeleton, cfg.lorasb.target_modules, cfg.lorasb.r)


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
    return {"model": cfg.model.name_or_path or "builtin:tiny-llama",
            "target_modules": list(cfg.lorasb.target_modules), "r": cfg.lorasb.r}


class Logger:
    """Rank 0 writes metrics to ``metrics.jsonl`` and to TensorBoard through ``engine.monitor``."""

    def __init__(self, engine, output_dir: str, rank: int):
        self.engine, self.rank = engine, rank
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a") if rank == 0 else None

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


def run(cfg: RunConfig, ds_config: dict) -> dict:
    """The training run; returns its summary (also written to ``run_summary.json`` by rank 0)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    from .dist import init_distributed, world_size_from_env

    # ---- everything that can be wrong is checked before the heavy work
    check_model_source(cfg.model)
    layout = resolve_batch_layout(ds_config, world_size_from_env())
    check_precision(ds_config, get_accelerator().device_name())
    check_targets_without_weights(cfg)
    tokenizer = load_tokenizer(cfg.model)
    examples, truncated = tokenize_rows(load_rows(cfg.data, cfg.train.seed), tokenizer, cfg.data)
    plan = make_plan(cfg, len(examples), layout.micro_batch, layout.grad_accum, layout.world_size)
    if not cfg.train.init_file:
        estimation_batches(cfg.lorasb.est_samples, len(examples), cfg.lorasb.est_micro_batch, 0,
                           layout.world_size, cfg.train.seed)
    out_dir = cfg.train.output_dir
    tb = ds_config.get("tensorboard")
    if tb and tb.get("enabled") and not tb.get("output_path"):
        ds_config = dict(ds_config, tensorboard=dict(tb, output_path=os.path.join(out_dir, "tensorboard")))

    rank, world, device = init_distributed(cfg.train.dist_timeout_minutes)
    if world != layout.world_size:  # an MPI launch announces its size only now
        layout = resolve_batch_layout(ds_config, world)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump({"run": cfg.to_dict(), "deepspeed": ds_config}, f, indent=2)
    deepspeed.runtime.utils.set_random_seed(cfg.train.seed)

    # ---- model, surgery, engine
    model = load_model(cfg.model, ds_config, model_dtype(ds_config))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = wrap_targets(model, cfg.lorasb.target_modules, cfg.lorasb.r, cfg.lorasb.dropout)
    counts = count_parameters(model, layers)
    r_params = [layer.lora_R for layer in layers.values()]
    t = cfg.train
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=r_params,
        optimizer=lambda params: torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                                   weight_decay=t.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(t.schedule, plan.warmup_steps, plan.total_steps)),
        config=ds_config,
    )
    logger = Logger(engine, out_dir, rank)
    if rank == 0:
        print(f"[lorasb] world {world}, micro-batch {layout.micro_batch} x accumulation "
              f"{layout.grad_accum} -> global batch {layout.global_batch}; {len(examples)} samples "
              f"({truncated} truncated); {plan.total_steps} steps, warm-up {plan.warmup_steps}")
        print(f"[lorasb] {len(layers)} LoRA-SB layers, r={cfg.lorasb.r}: {counts.describe()}")

    # ---- B, A, R: from the init file, or estimated now
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    owners = assign_owners(shapes, world)
    est_stats = None
    if cfg.train.init_file:
        inits, init_meta = load_init_file(cfg.train.init_file, layers)
        check_init_metadata(cfg.train.init_file, init_meta, init_metadata(cfg))
        init_path = cfg.train.init_file
    else:
        per_rank = estimation_batches(cfg.lorasb.est_samples, len(examples), cfg.lorasb.est_micro_batch,
                                      rank, world, cfg.train.seed)
        real = sum(len(b) > 0 for k in range(world) for b in estimation_batches(
            cfg.lorasb.est_samples, len(examples), cfg.lorasb.est_micro_batch, k, world, cfg.train.seed))
        batches = [(collate([examples[i] for i in (idx or [0])], tokenizer.pad_token_id),
                    1.0 / real if idx else 0.0) for idx in per_rank]
        grads, est_stats = estimate_gradients(engine.module, layers, batches, owners, device)
        t0 = time.perf_counter()
        index = {name: i for i, name in enumerate(layers)}  # a per-module SVD seed, owner-independent
        local = {name: init_from_gradient(G, cfg.lorasb, plan.lr_eff, cfg.train.seed + index[name])
                 for name, G in grads.items()}
        del grads
        svd_seconds = time.perf_counter() - t0
        inits = broadcast_inits(layers, local, owners, device)
        init_meta = dict(
            init_metadata(cfg), init_id=new_init_id(), update=cfg.lorasb.update, lr_eff=plan.lr_eff,
            est_samples=cfg.lorasb.est_samples, est_micro_batch=cfg.lorasb.est_micro_batch,
            svd=cfg.lorasb.svd, svd_oversample=cfg.lorasb.svd_oversample, svd_niter=cfg.lorasb.svd_niter,
            seed=cfg.train.seed, world_size=world, owners=owners, versions=_versions(),
        )
        init_path = os.path.join(out_dir, INIT_FILE_NAME)
        if rank == 0:
            save_init_file(init_path, inits, init_meta)
            print(f"[lorasb] estimation: {est_stats.micro_batches_per_rank} micro-batches per rank in "
                  f"{est_stats.seconds:.2f}s, SVDs on this rank {svd_seconds:.2f}s, lr_eff {plan.lr_eff:.3g}")
    apply_inits(layers, inits)
    energies = {name: init.energy for name, init in inits.items()}
    logger.log({"event": "init", "estimated": est_stats is not None, "init_file": init_path,
                "lr_eff": init_meta.get("lr_eff"), "mean_energy": sum(energies.values()) / len(energies)},
               tb={f"Estimation/energy/{n}": e for n, e in energies.items()})

    # ---- the training loop
    engine.train()
    step, losses = 0, []
    bar = tqdm(total=plan.total_steps, desc="train", disable=rank != 0)
    epoch = 0
    while step < plan.total_steps:
        for idx in train_batches(len(examples), layout.micro_batch, rank, world, epoch, cfg.train.seed):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx],
                                                         tokenizer.pad_token_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == plan.total_steps:
                mean_loss = torch.stack(losses).mean().to(device)
                dist.all_reduce(mean_loss)
                record = {"step": step, "loss": mean_loss.item() / world,
                          "lr": scheduler.get_last_lr()[0] if step < plan.total_steps else 0.0,
                          "grad_norm": _to_float(engine.get_global_grad_norm()),
                          "r_norm": r_norm(r_params)}
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                logger.log(record, tb={f"Train/{k}": v for k, v in record.items() if k != "step"})
            losses = []
            if step >= plan.total_steps:
                break
        epoch += 1
    bar.close()

    # ---- the adapter: R (fp32 master) per module + the init file
    final_R = {name: safe_get_full_fp32_param(layer.lora_R).detach().float().cpu().view(layer.r, layer.r)
               for name, layer in layers.items()}
    adapter_dir = os.path.join(out_dir, "adapter")
    summary = {
        "steps": step, "world_size": world, "global_batch": layout.global_batch,
        "estimated": est_stats is not None,
        "estimation_seconds": est_stats.seconds if est_stats else None,
        "init_id": init_meta.get("init_id"), "lr_eff": init_meta.get("lr_eff"),
        "trainable_parameters": counts.trainable, "frozen_adapter_parameters": counts.adapter_frozen,
        "base_parameters": counts.base, "truncated_samples": truncated,
    }
    if rank == 0:
        save_adapter(adapter_dir, final_R, init_path, init_meta)
        with open(os.path.join(out_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"[lorasb] adapter written to {adapter_dir}")
    logger.close()
    dist.barrier()
    return summary


def save_adapter(adapter_dir: str, final_R: dict[str, torch.Tensor], init_path: str, init_meta: dict) -> None:
    """``adapter/lorasb_adapter.safetensors`` (trained R) beside a copy of the init file (B, A, R0)."""
    os.makedirs(adapter_dir, exist_ok=True)
    init_copy = os.path.join(adapter_dir, INIT_FILE_NAME)
    if os.path.abspath(init_path) != os.path.abspath(init_copy):
        shutil.copyfile(init_path, init_copy + ".tmp")
        os.replace(init_copy + ".tmp", init_copy)
    meta = {"format": "lorasb-adapter-v1", "init_file": INIT_FILE_NAME,
            **{k: init_meta[k] for k in ("init_id", "model", "target_modules", "r")}}
    path = os.path.join(adapter_dir, ADAPTER_FILE_NAME)
    save_file({f"{n}.lora_R": R.contiguous() for n, R in final_R.items()}, path + ".tmp",
              metadata={"lorasb": json.dumps(meta)})
    os.replace(path + ".tmp", path)


def r_norm(r_params: list[torch.nn.Parameter]) -> float:
    """Frobenius norm of all R together (gathers them under ZeRO-3: collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(r_params):
        return math.sqrt(sum(float(p.float().square().sum()) for p in r_params))


def _to_float(x) -> float | None:
    return None if x is None else float(x)


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {"lorasb_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}
