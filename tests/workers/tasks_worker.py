"""Run by tests/test_tasks.py under ``torchrun``: one short run per case, through the pipeline's ``run``
on a ZeRO-3 engine with every parameter partitioned.

usage: torchrun --nproc_per_node 2 tests/workers/tasks_worker.py CASES.json
CASES.json: ``[{"overrides": [...]}, ...]``, each with its own ``train.output_dir``.
"""

import json
import sys

from lorasb_ds.cli import exit_process
from lorasb_ds.config import load_run_config
from lorasb_ds.train import run

ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}
for case in json.load(open(sys.argv[1])):
    run(load_run_config(None, case["overrides"]), ds_config)

exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
