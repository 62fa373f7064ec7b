"""Where LoRA-SB starts: the loss of the model at step 0 (W0 + B·R0·A) as a function of lr_eff.

    python bench/init_scale.py --init outputs/quality/runs/lorasb_lr0.001_seed1/lorasb_init.safetensors

The init holds ``B = U_r``, ``A = V_rᵀ`` and ``R0 = lr_eff · Σ_r`` of the truncated SVD of the estimated
first update ``-lr_eff · sign(G)``: B and A do not depend on lr_eff and R0 is proportional to it. So one
init file gives the starting point of every lr_eff: ``R0 · (lr_eff / lr_eff_of_the_file)``. The script
loads the model once (one process, plain torch, fp32), wraps its targets, and for each lr_eff prints the
mean response-token loss over the first ``--rows`` training examples (the rows the run trains on, through
its own prompt template), next to the base model's (R = 0) and to the scale of the first step that full
fine-tuning's chosen lr would take (``lr / warm-up steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="a LoRA-SB run's lorasb_init.safetensors")
    p.add_argument("--rows", type=int, default=32, help="training examples scored (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr_eff", default="0,1e-6,1e-5,1e-4,3e-4,1e-3,3e-3",
                   help="comma-separated lr_eff values (0: the base model)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from lorasb_ds.config import DataConfig, ModelConfig
    from lorasb_ds.data import collate, load_rows, tokenize_rows
    from lorasb_ds.files import load_init_file
    from lorasb_ds.modeling import load_tokenizer, tiny_llama
    from lorasb_ds.surgery import wrap_targets

    torch.set_num_threads(os.cpu_count() or 1)
    run_dir = os.path.dirname(os.path.abspath(args.init))
    run = json.load(open(os.path.join(run_dir, "run_config.json")))["run"]
    model_cfg, data_cfg = ModelConfig(**run["model"]), DataConfig(**run["data"])
    tokenizer = load_tokenizer(model_cfg)
    examples, _ = tokenize_rows(load_rows(data_cfg, run["train"]["seed"]), tokenizer, data_cfg)
    examples = examples[:args.rows]
    model = (AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.float32)
             if model_cfg.name_or_path else tiny_llama()).eval()
    meta_r = run["lorasb"]["r"]
    layers = wrap_targets(model, run["lorasb"]["target_modules"], meta_r)
    inits, meta = load_init_file(args.init, layers)
    file_lr_eff = float(meta["lr_eff"])
    for name, layer in layers.items():
        layer.lora_B.copy_(inits[name].B)
        layer.lora_A.copy_(inits[name].A)

    @torch.no_grad()
    def mean_loss() -> float:
        total, tokens = 0.0, 0
        for i in range(0, len(examples), args.batch):
            batch = collate(examples[i:i + args.batch], tokenizer.pad_token_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            total, tokens = total + nll.item(), tokens + int(mask.sum())
        return total / tokens

    print(f"init file: {os.path.relpath(args.init, REPO)} (lr_eff {file_lr_eff:g}, r {meta_r}, "
          f"{len(layers)} modules); {len(examples)} training examples, response tokens only")
    print("| lr_eff | step-0 loss | ‖B·R0·A‖_F summed over modules |")
    print("|---|---|---|")
    for value in (float(v) for v in args.lr_eff.split(",")):
        scale = value / file_lr_eff
        norm = 0.0
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_R.copy_(inits[name].R * scale)
                norm += float((inits[name].R * scale).norm())  # B, A orthonormal: ‖B R A‖_F = ‖R‖_F
        label = f"{value:g}" + (" (base model)" if value == 0 else "") + (" (this run)" if value == file_lr_eff else "")
        print(f"| {label} | {mean_loss():.4f} | {norm:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
