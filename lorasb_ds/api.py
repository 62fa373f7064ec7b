"""LoRA-SB as a library, for a training loop of your own or transformers' ``Trainer``:

    layers = lorasb_ds.wrap(model, LoraSBConfig(r=16))                  # targets wrapped; only R trains
    lorasb_ds.initialize(model, layers, batches, lr_eff=1e-3, init_path="out/lorasb_init.safetensors")
    ... train: the optimizer gets the trainable parameters, the R matrices ...
    lorasb_ds.save_adapter(layers, "out/adapter", "out/lorasb_init.safetensors")   # `lorasb export` reads it

``initialize`` is the launcher's estimation (``init.init_adapters``: the gradient taps, the owner
reduce, the owners' SVDs, the broadcast, the init file), on whatever process group runs: a plain model
in one process (a group of one is started for the call), or the module of a DeepSpeed engine (ZeRO-3
included) under any launcher. ``LoraSBCallback`` does the same inside ``Trainer``: it estimates once
when training begins and writes the adapter when it ends.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .config import ConfigError, LoraSBConfig, ModelConfig, RunConfig, TrainConfig
from .estimate import assign_owners, layer_shapes
from .files import ADAPTER_DIR_NAME, LayerInit, own_init_file, read_init_metadata, save_adapter as write_adapter_files
from .init import apply_inits, init_adapters
from .layer import LoRASBLinear
from .surgery import wrap_targets


def wrap(model: torch.nn.Module, cfg: LoraSBConfig | None = None) -> dict[str, LoRASBLinear]:
    """Freeze ``model`` and wrap its ``cfg.target_modules`` in LoRA-SB layers; returns {name: layer}.
    Only the layers' R (r x r) are left trainable (B, A for ``method: lora``)."""
    cfg = cfg or LoraSBConfig()
    return wrap_targets(model, cfg.target_modules, cfg.r, cfg.dropout, cfg.method, cfg.fuse_projections)


def layers_of(model: torch.nn.Module) -> dict[str, LoRASBLinear]:
    """The LoRA-SB layers of a wrapped model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRASBLinear)}


def initialize(model: torch.nn.Module, layers: dict[str, LoRASBLinear], batches: list[dict[str, torch.Tensor]],
               lr_eff: float, init_path: str, cfg: LoraSBConfig | None = None, seed: int = 0,
               device: torch.device | str | None = None) -> dict[str, LayerInit]:
    """Estimate B, A, R from ``batches`` and set them in ``layers``; rank 0 writes ``init_path``.

    ``batches``: this rank's micro-batches (``input_ids``, ``attention_mask``, ``labels`` tensors), as
    many on every rank; G is the mean gradient over all of them. ``cfg``: the estimation and SVD
    settings (default: LoRA-SB at the layers' rank). Collective when a process group runs (every rank
    calls it); in one process without one, a group of one is started for the call.
    Returns every module's init (CPU fp32)."""
    ranks = {layer.r for layer in layers.values()}
    if cfg is None:
        cfg = LoraSBConfig(r=min(ranks), target_modules=sorted({name.rsplit(".", 1)[-1] for name in layers}))
    if ranks != {cfg.r}:
        raise ConfigError(f"initialize: the layers have rank {sorted(ranks)}, cfg.r is {cfg.r}; pass the "
                          "LoraSBConfig the model was wrapped with")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with process_group():
        world = dist.get_world_size()
        counts = [None] * world
        dist.all_gather_object(counts, len(batches))
        if len(set(counts)) != 1 or counts[0] == 0:
            raise ConfigError(f"initialize: every rank must pass the same number (>= 1) of batches, got {counts}")
        weighted = [(batch, 1.0 / (counts[0] * world)) for batch in batches]
        name = getattr(model.config, "_name_or_path", None) or f"unnamed {type(model).__name__}"
        task = "seq_cls" if type(model).__name__.endswith("ForSequenceClassification") else "causal_lm"
        run = RunConfig(model=ModelConfig(name_or_path=name, task=task), lorasb=cfg, train=TrainConfig(seed=seed))
        owners = assign_owners(layer_shapes(layers), world)
        os.makedirs(os.path.dirname(os.path.abspath(init_path)), exist_ok=True)
        inits, _, _ = init_adapters(run, model, layers, owners, weighted, lr_eff, None, init_path, device)
        apply_inits(layers, inits)
    return inits


def save_adapter(layers: dict[str, LoRASBLinear], adapter_dir: str, init_path: str,
                 model: torch.nn.Module | None = None) -> None:
    """Write the adapter directory ``lorasb export`` and ``lorasb eval`` read: the trained tensors of
    ``layers`` (gathered under ZeRO-3, fp32 masters when an engine holds them) beside a copy of
    ``init_path``. ``model``: also save its other trained parameters (a classifier's head). Collective
    under a process group; rank 0 writes."""
    from deepspeed.utils import safe_get_full_fp32_param

    named = {f"{name}.{key}": p for name, layer in layers.items() for key, p in layer.named_parameters()
             if p.requires_grad and key.startswith("lora_")}
    if model is not None:
        in_layers = {id(p) for p in named.values()}
        named.update({n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_layers})
    trained = {}
    for name, p in named.items():
        full = safe_get_full_fp32_param(p) if hasattr(p, "ds_id") else p
        trained[name] = full.detach().float().cpu().reshape(getattr(p, "ds_shape", p.shape))
    meta = read_init_metadata(init_path)
    saved = [n.rsplit(".", 1)[0] for n in named if ".lora_" not in n]
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_adapter_files(adapter_dir, trained, init_path, dict(meta, modules_to_save=sorted(set(saved))))
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def process_group():
    """The running process group, or a gloo group of one for the duration (destroyed after)."""
    if dist.is_initialized():
        yield
        return
    from .ranks import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover (transformers is a dependency)
    TrainerCallback = object


class LoraSBCallback(TrainerCallback):
    """LoRA-SB inside transformers' ``Trainer`` (DeepSpeed ZeRO-3 or not): wrap the model with
    ``lorasb_ds.wrap`` before building the Trainer (so its optimizer holds only R), pass this callback.

    When training begins it runs ``initialize`` once on ``batches`` (this rank's), with ``lr_eff`` or,
    by default, the first warm-up step's rate (``learning_rate / warmup steps``); the init file goes to
    ``output_dir/lorasb_init.safetensors``. When training ends it writes ``output_dir/adapter``."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], cfg: LoraSBConfig | None = None,
                 lr_eff: float | None = None):
        self.batches, self.cfg, self.lr_eff = batches, cfg or LoraSBConfig(), lr_eff
        self.estimations = 0

    def init_path(self, args) -> str:
        return own_init_file(args.output_dir)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.estimations:
            return
        lr_eff = self.lr_eff or args.learning_rate / max(1, args.get_warmup_steps(state.max_steps))
        initialize(model, layers_of(model), self.batches, lr_eff, self.init_path(args), self.cfg, args.seed,
                   args.device)
        self.estimations += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_adapter(layers_of(model), os.path.join(args.output_dir, ADAPTER_DIR_NAME), self.init_path(args), model)
