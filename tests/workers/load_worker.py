"""Run by tests/test_loading.py under ``torchrun``: load a saved model with ``load_model`` under a
ZeRO-3 config and report, per rank, whether the weights arrived partitioned and what they hold.

usage: torchrun --nproc_per_node N tests/workers/load_worker.py MODEL_DIR OUT
"""

import json
import os
import sys

import deepspeed
import torch

from lorasb_ds.config import ModelConfig
from lorasb_ds.dist import init_distributed
from lorasb_ds.modeling import load_model

model_dir, out = sys.argv[1], sys.argv[2]
rank, world, _ = init_distributed(timeout_minutes=5)
ds_config = {"train_micro_batch_size_per_gpu": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
model = load_model(ModelConfig(name_or_path=model_dir), ds_config, torch.float32)
params = list(model.parameters())
report = {
    "rank": rank,
    "all_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
    "local_elements": sum(p.ds_tensor.numel() for p in params),
    "full_elements": sum(p.ds_numel for p in params),
}
with deepspeed.zero.GatheredParameters(params):
    report["checksum"] = {n: float(p.double().sum()) for n, p in model.named_parameters()}
with open(os.path.join(out, f"load{rank}.json"), "w") as f:
    json.dump(report, f)
