"""Run by tests/test_real_models.py under ``torchrun``: ``lorasb train`` exactly as ``launch/train.py`` runs
it, with two read-only probes that let the test see inside every rank:

* the partitioned loader (``zero3_loading.load_partitioned``) records that it built the model;
* right after the last training step, every rank dumps what it holds: each layer's B, A (buffers) and its
  gathered R to ``DUMP/rank{k}.safetensors``; the optimizer's parameters and the element counts of its
  fp32 masters and Adam moments (summed over ranks), and whether the frozen base weights are partitioned,
  to ``DUMP/rank{k}.json``. Rank 0 adds the sha256 of every frozen weight, gathered, under its name in
  the unwrapped model (tied weights under each of their names).

The probes read and gather only; training, checkpoints and the adapter are those of a plain run.

usage: torchrun --nproc_per_node N tests/workers/real_run_worker.py DUMP [lorasb train arguments ...]
"""

import hashlib
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import lorasb_ds.modeling
import lorasb_ds.train
from lorasb_ds.cli import entry

dump_dir, train_args = sys.argv[1], sys.argv[2:]
loaded_partitioned = []


def recording_load_partitioned(*args, **kwargs):
    model = original_load_partitioned(*args, **kwargs)
    loaded_partitioned.append(model.__class__.__name__)
    return model


def dumping_train_loop(s, *args, **kwargs):
    result = original_train_loop(s, *args, **kwargs)
    tensors = {}
    for name, layer in s.layers.items():
        with deepspeed.zero.GatheredParameters([layer.lora_R]):
            tensors[f"{name}.R"] = layer.lora_R.detach().float().clone()
        tensors[f"{name}.B"] = layer.lora_B.detach().float().clone()
        tensors[f"{name}.A"] = layer.lora_A.detach().float().clone()
    opt = s.engine.optimizer
    optimizer_params = {id(p) for group in opt.fp16_groups for p in group}
    counts = torch.tensor([sum(t.numel() for st in opt.optimizer.state.values() for t in st.values()
                               if torch.is_tensor(t) and t.dim() > 0),
                           sum(f.numel() for f in opt.fp32_partitioned_groups_flat)], dtype=torch.long)
    dist.all_reduce(counts)
    base = [layer.base.weight for layer in s.layers.values()]
    report = {
        "rank": s.rank, "world": s.world, "loaded_partitioned": loaded_partitioned,
        "optimizer_params_are_trained": optimizer_params == {id(p) for p in s.trained.values()},
        "trained_names": sorted(s.trained),
        "adam_state_elements": int(counts[0]), "fp32_master_elements": int(counts[1]),
        "base_weights_partitioned": all(p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in base),
    }
    if s.rank == 0:
        report["base_sha256"] = {}
    for name, p in s.engine.module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p]):
            if s.rank == 0:
                digest = hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                report["base_sha256"][name.replace(".base.", ".")] = digest
    save_file(tensors, os.path.join(dump_dir, f"rank{s.rank}.safetensors"))
    with open(os.path.join(dump_dir, f"rank{s.rank}.json"), "w") as f:
        json.dump(report, f)
    return result


original_load_partitioned = lorasb_ds.modeling.load_partitioned
original_train_loop = lorasb_ds.train.train_loop
lorasb_ds.modeling.load_partitioned = recording_load_partitioned
lorasb_ds.train.train_loop = dumping_train_loop
os.makedirs(dump_dir, exist_ok=True)
entry(["train", *train_args])
