"""Pretrain the built-in model shipped in ``lorasb_ds/assets/tiny-llama``: a character-level Llama that
knows arithmetic, so that fine-tuning it on word problems starts from a model that knows something.

    python bench/pretrain.py --out lorasb_ds/assets/tiny-llama      (defaults: the shipped checkpoint)

The corpus is generated here (seeded, deterministic) and teaches the character language and
arithmetic in forms *other* than the fine-tuning task (``lorasb_ds.data.synthetic_math_rows``:
Alpaca-prompted word problems answered "... The answer is: N"):

* plain equations, one per line: ``37 + 48 = 85``, ``7 * 12 = 84``, ``96 / 8 = 12``, ``63 - 17 = 46``;
* number facts in words: ``The sum of 37 and 48 is 85.``, ``85 is more than 37.``;
* short stories with names and objects, stated, never asked: ``Zoe had 20 coins. She lost 5 of them.
  Now she has 15 coins.``;
* one-step statements with their arithmetic written out, numbers read from the sentence into an
  equation: ``6 boxes of 7 eggs make 6 * 7 = 42 eggs.``, ``Tom had 31 pens and lost 9, so 31 - 9 = 22
  are left.``

It never contains a question, the Alpaca template, a two-step solution or "The answer is:".

Plain PyTorch on one process (this is not part of the product's pipeline): AdamW, linear warm-up and
cosine decay, random windows of the corpus (each starting at a line start, after ``<s>``). Seeded:
the same command on the same machine and thread count gives the same weights. The result is written
with ``save_pretrained`` (safetensors) next to the tokenizer (``lorasb_ds.modeling.tiny_tokenizer``),
so ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorasb_ds.modeling import tiny_tokenizer  # noqa: E402

NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Eva", "she"),
         ("Max", "he"), ("Zoe", "she"), ("Ben", "he"), ("Lily", "she"), ("Omar", "he"), ("Ivy", "she"),
         ("Noah", "he"), ("Rosa", "she")]
THINGS = ["apples", "pens", "cards", "books", "eggs", "shells", "stamps", "coins", "marbles", "cups",
          "hats", "toys", "cakes", "rocks", "plums", "bells"]
PLACES = ["the park", "the shop", "school", "the farm", "the beach", "the library", "the market"]
VERBS_GET = ["buys", "finds", "gets", "picks up", "wins"]
VERBS_LOSE = ["loses", "gives away", "sells", "eats", "drops"]


def _equation(rng: random.Random) -> str:
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.choice([(rng.randint(0, 60), rng.randint(0, 60)),
                           (rng.randint(10, 400), rng.randint(1, 60))])
        return f"{a} + {b} = {a + b}"
    if op == "-":
        a = rng.randint(1, 120)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    if op == "*":
        a, b = rng.choice([(rng.randint(2, 40), rng.randint(2, 9)), (rng.randint(2, 12), rng.randint(2, 15))])
        if rng.random() < 0.5:
            a, b = b, a
        return f"{a} * {b} = {a * b}"
    b, q = rng.randint(2, 9), rng.randint(1, 12)
    return f"{b * q} / {b} = {q}"


def _fact(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    if kind == 0:
        return f"The sum of {a} and {b} is {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} minus {lo} is {hi - lo}."
    if kind == 2:
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        return f"{x} times {y} is {x * y}."
    if kind == 3:
        x, q = rng.randint(2, 9), rng.randint(2, 12)
        return f"{x * q} split into {x} equal parts gives {q} each."
    if kind == 4:
        hi, lo = max(a, b) + 1, min(a, b)
        return f"{hi} is more than {lo}."
    return f"Double {a} is {2 * a}."


def _story(rng: random.Random) -> str:
    name, he = rng.choice(NAMES)
    He = he.capitalize()
    thing = rng.choice(THINGS)
    kind = rng.randrange(4)
    a = rng.randint(2, 40)
    if kind == 0:
        b = rng.randint(1, 30)
        return (f"{name} had {a} {thing}. {He} {rng.choice(VERBS_GET)} {b} more at {rng.choice(PLACES)}. "
                f"Now {he} has {a + b} {thing}.")
    if kind == 1:
        b = rng.randint(1, a)
        return f"{name} had {a} {thing}. {He} {rng.choice(VERBS_LOSE)} {b} of them. Now {he} has {a - b} {thing}."
    if kind == 2:
        n, k = rng.randint(2, 9), rng.randint(2, 12)
        return f"{name} has {n} boxes. Each box holds {k} {thing}. So there are {n * k} {thing} in all."
    other, _ = rng.choice(NAMES)
    return f"{name} likes {thing}. {He} goes to {rng.choice(PLACES)} with {other} every day."


ITEMS = ["toy", "book", "hat", "cake", "pen", "ball", "kite", "lamp"]


def _worked(rng: random.Random) -> str:
    """One statement with its arithmetic written out: numbers read from the sentence into an equation."""
    name, he = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return f"{name} had {a} {thing} and got {b} more, so {he} has {a} + {b} = {a + b} {thing}."
    if kind == 1:
        a = rng.randint(2, 80)
        b = rng.randint(1, a)
        return f"{name} had {a} {thing} and lost {b}, so {a} - {b} = {a - b} are left."
    if kind == 2:
        n, k = rng.randint(2, 9), rng.randint(2, 15)
        return f"{n} boxes of {k} {thing} make {n} * {k} = {n * k} {thing}."
    if kind == 3:
        b, q = rng.randint(2, 9), rng.randint(1, 12)
        return f"{b * q} {thing} shared by {b} kids is {b * q} / {b} = {q} each."
    if kind == 4:
        p = rng.randint(2, 60)
        c = p + rng.randint(1, 50)
        return (f"A {rng.choice(ITEMS)} costs ${p}. {name} pays ${c}, so the change is {c} - {p} = {c - p} "
                f"dollars.")
    a, b = rng.randint(2, 40), rng.randint(2, 9)
    return f"{name} walks {a} miles a day for {b} days: {a} * {b} = {a * b} miles."


def corpus_lines(n: int, seed: int) -> list[str]:
    """``n`` lines: about 40% equations, 15% number facts, 15% stories and 30% worked statements.
    Deterministic."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        u = rng.random()
        lines.append(_equation(rng) if u < 0.4 else _fact(rng) if u < 0.55 else _story(rng) if u < 0.7
                     else _worked(rng))
    return lines


def model_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab_size: int = 128,
                 max_positions: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)


def encode_stream(lines: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as one id stream (lines joined by newlines) and the offsets where lines start."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    newline = vocab["\n"]
    ids, starts = [], []
    for line in lines:
        starts.append(len(ids))
        ids.extend(vocab.get(c, unk) for c in line)
        ids.append(newline)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def pretrain(out: str, steps: int = 3000, batch_size: int = 8, seq_len: int = 256, lr: float = 3e-3,
             warmup: int = 100, weight_decay: float = 0.1, seed: int = 0, corpus_size: int = 300_000,
             hidden: int = 128, layers: int = 4, intermediate: int = 384, heads: int = 4, kv_heads: int = 2,
             threads: int = 2, log_every: int = 100, device: str = "cpu", log=lambda m: print(m, flush=True)) -> dict:
    """Pretrain, save to ``out``, and return a summary (also written to ``out/pretrain.json``)."""
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    lines = corpus_lines(corpus_size, seed)
    stream, starts = encode_stream(lines, tokenizer)
    starts = starts[starts + seq_len - 1 <= len(stream)]
    model = LlamaForCausalLM(model_config(hidden, layers, intermediate, heads, kv_heads)).to(device)
    stream, starts = stream.to(device), starts.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warmup if k < warmup
        else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup)))))
    gen = torch.Generator().manual_seed(seed)  # batch choice on the CPU: the same on every device
    bos = torch.full((batch_size, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
    offsets = torch.arange(seq_len - 1, device=device)
    log(f"[pretrain] {n_params:,} parameters; corpus {len(lines):,} lines, {len(stream):,} characters; "
        f"{steps} steps of {batch_size} x {seq_len} tokens, {torch.get_num_threads()} thread(s)")
    model.train()
    curve, recent = [], []
    for step in range(1, steps + 1):
        pick = starts[torch.randint(len(starts), (batch_size,), generator=gen).to(device)]
        ids = torch.cat([bos, stream[pick[:, None] + offsets]], dim=1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent.append(loss.detach())
        if step % log_every == 0 or step == steps:
            mean = torch.stack(recent).mean().item()
            curve.append({"step": step, "loss": mean})
            log(f"[pretrain] step {step}/{steps} loss {mean:.4f} ({time.time() - started:.0f}s)")
            recent = []
    os.makedirs(out, exist_ok=True)
    model.cpu().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    summary = {"parameters": n_params, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
               "warmup": warmup, "weight_decay": weight_decay, "seed": seed, "corpus_lines": len(lines),
               "corpus_characters": int(len(stream)), "hidden": hidden, "layers": layers,
               "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
               "threads": torch.get_num_threads(), "device": _device_name(device), "final_loss": curve[-1]["loss"], "curve": curve,
               "seconds": round(time.time() - started, 1), "torch": torch.__version__,
               "transformers": _transformers_version()}
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"[pretrain] written to {out}: final loss {summary['final_loss']:.4f}, {summary['seconds']:.0f}s")
    return summary


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The pretraining settings; ``prefix`` (e.g. ``pretrain_``) names them inside another script."""
    import inspect

    params = inspect.signature(pretrain).parameters
    for name in ("steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "seed", "corpus_size",
                 "hidden", "layers", "intermediate", "heads", "kv_heads", "threads", "log_every", "device"):
        value = params[name].default
        p.add_argument(f"--{prefix}{name}", type=type(value), default=value, help=f"(default: {value})")


@torch.no_grad()
def probe(model_dir: str, per_op: int = 30, seed: int = 5) -> dict[str, float]:
    """Greedy completion of ``per_op`` random equations ``a OP b =`` per operation (ranges of the corpus);
    the fraction completed with the right number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    scores = {}
    for op in "+-*/":
        right = 0
        for _ in range(per_op):
            line = _equation(rng)
            while line.split()[1] != op:
                line = _equation(rng)
            prompt, answer = line.rsplit("= ", 1)
            ids = tokenizer(prompt + "=", return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            right += text.strip().split("\n")[0].strip() == answer
        scores[op] = right / per_op
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the checkpoint and tokenizer")
    p.add_argument("--probe", metavar="DIR", help="instead of pretraining: greedy accuracy of a pretrained "
                                                  "model on 30 random equations per operation")
    add_arguments(p)
    args = vars(p.parse_args(argv))
    model_dir = args.pop("probe")
    if model_dir:
        scores = probe(model_dir)
        print("[pretrain] probe: " + ", ".join(f"'a {op} b =' {v:.0%}" for op, v in scores.items()))
        return 0
    if not args["out"]:
        p.error("--out is required (or --probe DIR)")
    pretrain(**args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
