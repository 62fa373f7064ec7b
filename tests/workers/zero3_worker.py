"""Run by tests/test_zero3.py under ``torchrun``: one tiny LoRA-SB run on a real ZeRO-3 engine with
every parameter partitioned, dumping what the test checks into ``OUT/rank{k}.safetensors`` and
``OUT/rank{k}.json``.

usage: torchrun --nproc_per_node N tests/workers/zero3_worker.py OUT SVD STEPS CHECKPOINTING
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lorasb_ds.cli import exit_process
from lorasb_ds.config import load_run_config
from lorasb_ds.estimate import (OwnerReducer, bucket_bytes, estimate_gradients, estimation_groups, layer_shapes,
                                weighted_estimation_batches)
from lorasb_ds.init import apply_inits, broadcast_inits, init_from_gradient
from lorasb_ds.prepare import prepare
from lorasb_ds.runlog import Logger
from lorasb_ds.train import build, train_loop

out, svd, steps, checkpointing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = load_run_config(None, [
    f"train.output_dir={out}", "lorasb.r=8", "lorasb.est_samples=7", "lorasb.est_micro_batch=3",
    f"lorasb.svd={svd}", "data.builtin_size=64", f"train.max_steps={steps}", "train.lr=1e-2",
    "train.warmup_ratio=0.0", f"model.gradient_checkpointing={checkpointing}",
])
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}
s = build(prepare(cfg, ds_config))
rank, names = s.rank, list(s.layers)
base_weights = [layer.base.weight for layer in s.layers.values()]
r_params = [layer.lora_R for layer in s.layers.values()]
report = {"rank": rank, "world": s.world, "owners": s.owners}

# ZeRO-3 really partitions W0 and R: this rank holds a flat slice, the parameter itself is empty.
report["partitioned"] = [
    {"name": n, "shape": list(p.shape), "ds_numel": p.ds_numel, "local": p.ds_tensor.numel()}
    for n, p in zip(names + [n + ".R" for n in names], base_weights + r_params)
]

batches = weighted_estimation_batches(s.prepared.examples, cfg.lorasb.est_samples, cfg.lorasb.est_micro_batch,
                                      rank, s.world, cfg.train.seed, s.prepared.tokenizer.pad_token_id)
report["estimation_batches"] = [[int(x) for x in b["input_ids"].shape] + [w] for b, w in batches]
grads, _ = estimate_gradients(s.engine.module, s.layers, batches, s.owners, s.device)

# The same estimation in groups of modules under a budget of about a third of the busiest rank's
# accumulators, each group in its own pass: every G must come out bitwise the same.
shapes = layer_shapes(s.layers)
loads = [sum(4 * o * i for n, (o, i) in shapes.items() if s.owners[n] == k) for k in range(s.world)]
budget = max(4 * max(o * i for o, i in shapes.values()), max(loads) // 3)
groups = estimation_groups(shapes, s.owners, budget)
grouped = {}
for group in groups:
    part, _ = estimate_gradients(s.engine.module, {n: s.layers[n] for n in group}, batches, s.owners, s.device)
    grouped.update(part)
report["estimation_groups"] = len(groups)
report["grouped_G_bitwise_equal"] = (grouped.keys() == grads.keys()
                                     and all(torch.equal(grouped[n], grads[n]) for n in grads))

# The same estimation with each module reduced on its own, and with buckets of about two modules: the
# coalesced reductions must give bitwise the same G, in fewer collective calls.
report["reductions"], report["bucketed_G_bitwise_equal"] = {}, {}
report["module_bytes"] = {n: 4 * o * i for n, (o, i) in shapes.items()}
for label, size in (("per_module", 0), ("two_modules", 2 * 4 * max(o * i for o, i in shapes.values())),
                    ("default", bucket_bytes(cfg.lorasb.est_bucket_mb))):
    reducer = OwnerReducer(s.layers, s.owners, rank, s.device, size)
    again, _ = estimate_gradients(s.engine.module, s.layers, batches, s.owners, s.device, reducer=reducer)
    report["reductions"][label] = reducer.reductions
    report["bucketed_G_bitwise_equal"][label] = (again.keys() == grads.keys()
                                                 and all(torch.equal(again[n], grads[n]) for n in grads))
local = {n: init_from_gradient(G, cfg.lorasb, s.prepared.schedule.lr_eff, cfg.train.seed + names.index(n))
         for n, G in grads.items()}
inits = broadcast_inits(s.layers, local, s.owners, s.device)
apply_inits(s.layers, inits)
report["lr_eff"] = s.prepared.schedule.lr_eff

tensors = {f"G.{n}": G for n, G in grads.items()}
for n, init in inits.items():
    tensors.update({f"init.{n}.B": init.B, f"init.{n}.A": init.A, f"init.{n}.R": init.R})
    tensors[f"init.{n}.energy"] = torch.tensor(init.energy)


def snapshot(prefix):
    with deepspeed.zero.GatheredParameters(base_weights + r_params):
        for n, layer in s.layers.items():
            tensors[f"{prefix}.{n}.W0"] = layer.base.weight.detach().clone()
            tensors[f"{prefix}.{n}.R"] = layer.lora_R.detach().clone()
            tensors[f"{prefix}.{n}.B"] = layer.lora_B.clone()
            tensors[f"{prefix}.{n}.A"] = layer.lora_A.clone()


snapshot("before")
logger = Logger(s.engine, out, rank)
train_loop(s, logger)
logger.close()
snapshot("after")

# What the optimizer holds: its low-precision parameter groups and its fp32 state, counted over ranks.
opt = s.engine.optimizer
report["optimizer_params_are_R"] = (
    {id(p) for group in opt.fp16_groups for p in group} == {id(p) for p in r_params})
state = torch.tensor([sum(t.numel() for st in opt.optimizer.state.values() for t in st.values()
                          if torch.is_tensor(t) and t.dim() > 0),
                      sum(f.numel() for f in opt.fp32_partitioned_groups_flat)], dtype=torch.long)
dist.all_reduce(state)
report["adam_state_elements"], report["fp32_master_elements"] = state.tolist()
report["r_elements"] = sum(layer.r ** 2 for layer in s.layers.values())

save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
dist.barrier()

exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
