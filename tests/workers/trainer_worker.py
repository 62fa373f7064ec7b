"""Run by tests/test_api.py under ``torchrun``: LoRA-SB in transformers' ``Trainer`` (or TRL's
``SFTTrainer``) with a DeepSpeed ZeRO-3 config, through ``lorasb_ds.wrap`` and ``LoraSBCallback`` only,
as a user's script would. Writes what the test checks to ``OUT/report.json`` and the trained model's
logits to ``OUT/logits.pt``.

usage: torchrun --nproc_per_node 2 tests/workers/trainer_worker.py OUT trainer|sft
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import lorasb_ds
from lorasb_ds.cli import exit_process
from lorasb_ds.data import collate, synthetic_math_rows
from lorasb_ds.modeling import TINY_LLAMA_DIR, tiny_tokenizer

out, kind = sys.argv[1], sys.argv[2]
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
settings = dict(output_dir=out, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, warmup_steps=1,
                deepspeed=ds_config, report_to=[], save_strategy="no", logging_steps=1, seed=3)

cfg = lorasb_ds.LoraSBConfig(r=8)
model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA_DIR, dtype=torch.float32)
layers = lorasb_ds.wrap(model, cfg)
tokenizer = tiny_tokenizer()
texts = [row["query"] + row["response"] for row in synthetic_math_rows(16, 0)]
examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in texts]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
mine = examples[rank::world][:6]  # this rank's estimation data: 3 micro-batches of 2
callback = lorasb_ds.LoraSBCallback([collate(mine[i:i + 2], tokenizer.pad_token_id) for i in range(0, 6, 2)], cfg)
if kind == "sft":  # TRL tokenizes the text itself
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=model, args=SFTConfig(**settings, max_length=64, bf16=False), callbacks=[callback],
                         train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                         processing_class=AutoTokenizer.from_pretrained(TINY_LLAMA_DIR))
else:
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=examples,
                      data_collator=lambda rows: collate(rows, tokenizer.pad_token_id), callbacks=[callback])
trainer.train()

engine = trainer.model_wrapped
opt = engine.optimizer
counts = torch.tensor([sum(f.numel() for f in opt.fp32_partitioned_groups_flat),
                       sum(t.numel() for st in opt.optimizer.state.values() for t in st.values()
                           if torch.is_tensor(t) and t.dim() > 0)], dtype=torch.long)
dist.all_reduce(counts)
ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
engine.eval()
with torch.no_grad():
    logits = engine(input_ids=ids).logits.float()
if rank == 0:
    torch.save({"ids": ids, "logits": logits}, os.path.join(out, "logits.pt"))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"estimations": callback.estimations, "fp32_master_elements": int(counts[0]),
                   "adam_state_elements": int(counts[1]), "r_elements": sum(l.r ** 2 for l in layers.values()),
                   "trained_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                   "global_step": trainer.state.global_step}, f)
dist.barrier()

exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
