"""Run by tests/test_loading.py under ``torchrun``: load saved models with ``load_model`` under a
ZeRO-3 config (``stage3_param_persistence_threshold: 0``: every weight is partitioned) and report.

usage: torchrun --nproc_per_node N tests/workers/load_worker.py OUT JOB [JOB ...]

A JOB is ``TAG:MODEL_DIR:DTYPE[:FLAG]`` (DTYPE ``fp32`` or ``bf16``; FLAG ``rss``, ``offload``: with
``offload_param`` to the CPU, or ``seqcls``: a 3-label ``AutoModelForSequenceClassification``, its
``score`` head new, ``lm_head`` unused). Per job, every rank writes
``OUT/TAG.rank{k}.json``: whether every parameter arrived partitioned, its element counts, and its
host memory around the load (VmRSS right before, peak VmHWM during, VmRSS after; the peak is reset
right before loading so that it measures the load alone). Without ``rss`` the parameters are then
gathered and rank 0 writes them, with the buffers, to ``OUT/TAG.safetensors``.
"""

import gc
import json
import os
import sys

import deepspeed
import torch
from safetensors.torch import save_file

from lorasb_ds.cli import exit_process
from lorasb_ds.config import ModelConfig
from lorasb_ds.ranks import init_distributed
from lorasb_ds.modeling import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Make VmHWM equal to the current VmRSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


out, jobs = sys.argv[1], sys.argv[2:]
rank, world, _ = init_distributed(timeout_minutes=5)
for job in jobs:
    tag, model_dir, dtype_name, *flags = job.split(":")
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "bf16": {"enabled": dtype_name == "bf16"},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if "offload" in flags:
        ds_config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    gc.collect()
    rss_before = status_bytes("VmRSS")
    peak_was_reset = reset_peak()
    if "seqcls" in flags:
        from transformers import AutoModelForSequenceClassification

        from lorasb_ds.modeling import load_pretrained

        model = load_pretrained(AutoModelForSequenceClassification, ModelConfig(name_or_path=model_dir), ds_config,
                                DTYPES[dtype_name], new=(r"^score\.",), unused=(r"^lm_head\.",), num_labels=3)
    else:
        model = load_model(ModelConfig(name_or_path=model_dir), ds_config, DTYPES[dtype_name])
    report = {"rank": rank, "world": world, "rss_before": rss_before, "peak_was_reset": peak_was_reset,
              "hwm": status_bytes("VmHWM"), "rss_after": status_bytes("VmRSS")}
    params = list(model.parameters())
    report.update(
        all_partitioned=all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
        local_elements=sum(p.ds_tensor.numel() for p in params),
        local_bytes=sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        full_elements=sum(p.ds_numel for p in params),
        full_bytes=sum(p.ds_numel * p.ds_tensor.element_size() for p in params),
        training=model.training,
    )
    if "rss" not in flags:
        with deepspeed.zero.GatheredParameters(params):
            tensors = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
        tensors.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
        if rank == 0:
            save_file(tensors, os.path.join(out, f"{tag}.safetensors"))
    with open(os.path.join(out, f"{tag}.rank{rank}.json"), "w") as f:
        json.dump(report, f)
    del model, params

exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
