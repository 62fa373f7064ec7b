"""Run by tests/test_methods.py under ``torchrun``: the same short run once per ``lorasb.method``, through
the pipeline's ``run`` on a ZeRO-3 engine with every parameter partitioned. Each run writes its usual
outputs to ``OUT/<method>``.

For ``lora`` (B and A trained, partitioned) the run is then resumed from its step-2 checkpoint, after
its final adapter was put aside as ``OUT/lora_first_adapter.safetensors``.

usage: torchrun --nproc_per_node 2 tests/workers/methods_worker.py OUT METHOD [METHOD ...]
"""

import os
import shutil
import sys

import torch.distributed

from lorasb_ds.cli import exit_process
from lorasb_ds.config import load_run_config
from lorasb_ds.train import run

out, methods = sys.argv[1], sys.argv[2:]
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}


def settings(method: str, *extra: str):
    return load_run_config(None, [
        f"lorasb.method={method}", f"train.output_dir={os.path.join(out, method)}", "lorasb.r=8",
        "lorasb.svd=exact", "data.builtin_size=48", "train.max_steps=3", "train.lr=1e-2",
        "train.warmup_ratio=0.0", "train.schedule=constant", "train.save_every=1", *extra,
    ])


for method in methods:
    run(settings(method), ds_config)
    if method == "lora":
        run_dir = os.path.join(out, method)
        if int(os.environ["RANK"]) == 0:
            shutil.copyfile(os.path.join(run_dir, "adapter", "lorasb_adapter.safetensors"),
                            os.path.join(out, "lora_first_adapter.safetensors"))
            shutil.rmtree(os.path.join(run_dir, "checkpoints", "step00000003"))
        torch.distributed.barrier()
        run(settings(method, "train.resume=auto"), ds_config)

exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
