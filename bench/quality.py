"""Quality study: LoRA-SB against LoRA-XS, LoRA and full fine-tuning on a real pretrained instruct model
(SmolLM2-135M-Instruct), trained and evaluated through the product's own command line.

    lorasb fetch smollm2-135m-instruct --out models/smollm2-135m-instruct    # once
    python bench/quality.py                 # the study: lr sweep on validation, then 3 seeds, test scores
    python bench/quality.py --quick         # a few steps of two methods, to see that it all runs (≤ 10 min)

What it does:

1. **Data**: ``data/word_problems/`` (``scripts/make_word_problems.py``): multi-step arithmetic word
   problems in GSM8K's layout (a question; a worked answer ending ``#### N``). ``train`` and
   ``validation`` share templates and names; ``test`` uses templates and names that training never saw;
   ``test_seen`` asks new problems of the training stories (what ``validation`` asks, but unused by the
   choice of lr).
2. **Prompt**: one prompt both ways: training rows go through ``data.prompt_template=chat`` (the question
   as the user turn of the model's chat template) and ``lorasb eval --prompt_template chat`` builds the
   same prompt for the same question.
3. **Rows**: the base model zero-shot (the floor); LoRA-SB r = 96; LoRA-XS r = 96 (the same trained
   count); LoRA r = 32 (PEFT-style, alpha 2r); full fine-tuning. Same data, steps and batch for all,
   each run through ``launch/train.py`` under ``torch.distributed.run`` with ``ds_configs/zero3.json``
   and ``bench/quality.yaml``.
4. **Learning rate**: each method's lrs (``SWEEP_LR``) are trained on the first seed and scored on the
   validation split; the best strict accuracy wins (ties: flexible accuracy, then final training loss).
   The test split plays no part in the choice. The other seeds are trained at the chosen lr. A method
   given one lr has no choice to make: its run is scored on validation, test and test_seen in one launch.
5. **Test**: every kept run (and the base model) by ``lorasb eval --task gsm8k`` on the test split and
   on test_seen (both in one launch): strict (the number after the last ``####`` or ``The answer is:``)
   and flexible (the last number). The test split measures carrying the arithmetic to unseen stories,
   test_seen learning it in the stories trained on.
6. **Cache**: each finished run's results go to ``--results/runs/NAME.json`` as soon as they exist,
   with the settings that made them; a rerun with the same settings reads them instead of training
   again, so the study can be done in several sittings.
7. **Report** (printed, and in ``--results/quality.json`` and ``quality.md``): per method, strict and
   flexible test accuracy (mean ± sample std over seeds), final loss, trained numbers, optimizer-state
   bytes (fp32 Adam: master copy + two moments per trained number, 12 bytes), wall time per run; the lr
   sweep; and whether, here, (i) LoRA-SB ≥ LoRA-XS at the same count, (ii) LoRA-SB is within 1 point of
   LoRA r = 32 or above it with ≥ 5× fewer trained numbers, (iii) LoRA-SB's loss leads early; (i) and (ii)
   again on test_seen, with its own table.

"Final loss" is the mean training loss of the last fifth of the steps (each step's loss is the mean
over its global batch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402  (bench/common.py)

METHODS = ("lorasb", "lora", "loraxs", "full")  # the default study, in its order: the key comparisons first
# Rows beyond the default study (--methods names them): row -> (lorasb.method, extra run-config overrides).
# lorasb_lr_eff: LoRA-SB with its first step set apart from R's learning rate, at the scale where the
# step-0 loss is lowest on training examples (bench/init_scale.py: 1e-4 on SmolLM2).
# lorasb_svd: the LoRA-SB row with the converged SVD instead of the randomized one, at the lr that row
# chose: one change at a time (lorasb_lr_eff changed both).
VARIANTS = {"lorasb_lr_eff": ("lorasb", ["lorasb.lr_eff=1e-4", "lorasb.svd=converged"]),
            "lorasb_svd": ("lorasb", ["lorasb.svd=converged"])}
# The SVD each default row's cached runs were made with (the randomized one was the default then).
ROW_OVERRIDES = {"lorasb": ["lorasb.svd=randomized"], "loraxs": ["lorasb.svd=randomized"]}
ROWS = (*METHODS, *VARIANTS)
LABELS = {"base": "base model, zero-shot", "lorasb": "LoRA-SB", "loraxs": "LoRA-XS", "lora": "LoRA",
          "full": "full fine-tuning", "lorasb_lr_eff": "LoRA-SB, lr_eff 1e-4",
          "lorasb_svd": "LoRA-SB, converged SVD"}
RANKS = {"lorasb": 96, "loraxs": 96, "lora": 32, "full": 0, "lorasb_lr_eff": 96, "lorasb_svd": 96}
SWEEP_LR = {"lorasb": [1e-3, 3e-3, 1e-2], "loraxs": [1e-3, 3e-3, 1e-2], "lora": [3e-4, 1e-3, 3e-3],
            "full": [1e-5, 3e-5, 1e-4], "lorasb_lr_eff": [1e-3, 3e-3, 1e-2], "lorasb_svd": [1e-3]}
DEFAULT_MODEL = os.path.join(REPO, "models", "smollm2-135m-instruct")
DATA_DIR = os.path.join(REPO, "data", "word_problems")
RUN_CONFIG = os.path.join(REPO, "bench", "quality.yaml")
DS_CONFIG = os.path.join(REPO, "ds_configs", "zero3.json")
OPTIMIZER_BYTES_PER_TRAINED = 12  # fp32 master + Adam's two moments (the engine's state is 3 elements each)


def log(msg: str) -> None:
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="LoRA-SB and LoRA, one lr, one seed, 4 steps, 8 test rows: everything runs (≤ 10 min)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: models/smollm2-135m-instruct)")
    p.add_argument("--data", default=DATA_DIR, help="folder with train/validation/test.jsonl (default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated rows of {', '.join(ROWS)} (default: {','.join(METHODS)}; --quick: "
                        "lorasb,lora)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="learning rates of a method (replaces its SWEEP_LR; repeatable)")
    p.add_argument("--seeds", default="1,2,3", help="train.seed values; the first runs the sweep (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every run (default: %(default)s)")
    p.add_argument("--est_samples", type=int, default=None, help="lorasb.est_samples (default: the run config's)")
    p.add_argument("--val_rows", type=int, default=100, help="validation problems for the lr choice (default: %(default)s)")
    p.add_argument("--test_rows", type=int, default=0, help="test problems (default 0: all)")
    p.add_argument("--max_new_tokens", type=int, default=96, help="eval generation length (default: %(default)s)")
    p.add_argument("--eval_batch", type=int, default=25, help="eval prompts per generate call per rank")
    p.add_argument("--nproc", type=int, default=2, help="processes per training / evaluation (default: %(default)s)")
    p.add_argument("--no_base", action="store_true", help="leave out the base model's zero-shot row")
    p.add_argument("--report_only", action="store_true",
                   help="train and evaluate nothing: report the cached runs; a row whose runs are not all done is "
                        "left out and named")
    p.add_argument("--write_docs", action="store_true",
                   help="also put the report into README.md (table and claims) and bench/README.md (all of it)")
    p.add_argument("--workdir", default=None,
                   help="runs and logs (default: outputs/quality; --quick: outputs/quality-quick)")
    p.add_argument("--results", default=None,
                   help="cached per-run results and the report (default: bench/results/quality; --quick: "
                        "outputs/quality-quick/results, so a quick run never replaces the study's cache)")
    return p


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    """``["lorasb=1e-3,3e-3", "full=1e-4"]`` -> ``{"lorasb": [0.001, 0.003], "full": [0.0001]}``."""
    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in ROWS:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR[,LR...] with METHOD in {', '.join(ROWS)}")
        out[method] = [float(v) for v in values.split(",") if v.strip()]
    return out


def rel(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (commands run from there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def config_digest(path: str) -> str:
    """sha256 of a model's config.json without the version of transformers that wrote it, so a cached run
    stays valid when the same model is written again by another release."""
    config = json.load(open(path))
    config.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- processes


def launch(script: str, args: list[str], nproc: int, log_path: str) -> tuple[int, float]:
    """``python -m torch.distributed.run --nproc_per_node N script args``; output to ``log_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(common.free_port()), script, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    started = time.time()
    with open(log_path, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - started


def tail(path: str, n: int = 12) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# --------------------------------------------------------------------------- one run, cached


class Study:
    """Settings shared by every run, the cache, and the two operations: train and evaluate."""

    def __init__(self, args):
        self.args = args
        self.model = rel(args.model)
        self.split = {s: rel(os.path.join(args.data, f"{s}.jsonl")) for s in ("train", "validation", "test")}
        # the second test split (training stories, new numbers) came later: its digest goes with each score
        # instead of into the key, so the runs cached before it stay valid
        self.split["test_seen"] = rel(os.path.join(args.data, "test_seen.jsonl"))
        self.test_seen_digest = sha256_of(self.split["test_seen"])
        # what makes a cached result valid: the model, the data, the run config and the shared settings
        self.key = {"model_config": config_digest(os.path.join(args.model, "config.json")),
                    "model_weights_bytes": os.path.getsize(os.path.join(args.model, "model.safetensors")),
                    **{f"data_{s}": sha256_of(self.split[s]) for s in ("train", "validation", "test")},
                    "run_config": sha256_of(RUN_CONFIG), "ds_config": sha256_of(DS_CONFIG),
                    "steps": args.steps, "est_samples": args.est_samples, "nproc": args.nproc,
                    "max_new_tokens": args.max_new_tokens, "val_rows": args.val_rows, "test_rows": args.test_rows}
        self.cache_dir = os.path.join(args.results, "runs")

    def cached(self, name: str) -> dict | None:
        path = os.path.join(self.cache_dir, f"{name}.json")
        if not os.path.isfile(path):
            return None
        run = json.load(open(path))
        return run if run.get("key") == self.key else None

    def store(self, run: dict) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        from lorasb_ds.files import atomic_write_text

        atomic_write_text(json.dumps(run, indent=1), os.path.join(self.cache_dir, f"{run['name']}.json"))

    def train(self, method: str, lr: float, seed: int, again: bool = False) -> dict:
        """Train one run (or read it from the cache, unless ``again``); returns its record."""
        name = f"{method}_lr{lr:g}_seed{seed}"
        run = None if again else self.cached(name)
        if run is not None and "train_rc" in run:
            log(f"  {name}: cached (final loss {run.get('final_loss')})")
            return run
        if self.args.report_only:
            return {"name": name, "method": method, "lr": lr, "seed": seed, "status": "pending", "curve": []}
        a = self.args
        out = rel(os.path.join(a.workdir, "runs", name))
        lorasb_method, extra = VARIANTS.get(method, (method, ROW_OVERRIDES.get(method, [])))
        overrides = [f"model.name_or_path={self.model}", f"lorasb.method={lorasb_method}", f"train.lr={lr:g}",
                     f"train.seed={seed}", f"train.max_steps={a.steps}", f"data.path={self.split['train']}"]
        if RANKS[method]:
            overrides.append(f"lorasb.r={RANKS[method]}")
        overrides += extra
        if a.est_samples:
            overrides.append(f"lorasb.est_samples={a.est_samples}")
        log_path = os.path.join(a.workdir, "logs", f"train_{name}.log")
        rc, seconds = launch("launch/train.py", ["--ds_config", rel(DS_CONFIG), "--config", rel(RUN_CONFIG),
                                                 "--output_dir", out, "--overwrite", *overrides], a.nproc, log_path)
        run = {"name": name, "key": self.key, "method": method, "r": RANKS[method], "lr": lr, "seed": seed,
               "output_dir": out, "train_rc": rc, "train_seconds": round(seconds, 1),
               "train_command": f"launch/train.py ... {shlex.join(overrides)}"}
        metrics = os.path.join(REPO, out, "metrics.jsonl")
        curve = [(r["step"], r["loss"]) for r in map(json.loads, open(metrics)) if "step" in r] \
            if os.path.isfile(metrics) else []
        run["curve"] = curve
        if rc != 0 or not curve:
            run["status"] = "diverged" if rc == 3 else "failed"
            log(f"  {name}: exit {rc} ({run['status']}); log {rel(log_path)}\n{tail(log_path)}")
            if rc == 3:
                self.store(run)  # a divergence is an outcome of the sweep; a crash is not cached
            return run
        summary = json.load(open(os.path.join(REPO, out, "run_summary.json")))
        run.update(status="ok", final_loss=statistics.fmean(loss for _, loss in curve[-max(1, len(curve) // 5):]),
                   trainable=summary["trainable_parameters"], estimation_seconds=summary.get("estimation_seconds"))
        run["optimizer_state_bytes"] = OPTIMIZER_BYTES_PER_TRAINED * run["trainable"]
        if lorasb_method == "lorasb":
            from lorasb_ds.files import read_init_metadata

            run["energy"] = read_init_metadata(os.path.join(REPO, out, "lorasb_init.safetensors"))["energy"]
        self.store(run)
        log(f"  {name}: final loss {run['final_loss']:.4f}, {run['trainable']:,} trained, {seconds:.0f} s")
        return run

    def scored(self, run: dict, split: str) -> bool:
        """Whether ``run``'s record holds a valid score on ``split``."""
        return split in run and (split != "test_seen" or run[split].get("data") == self.test_seen_digest)

    def evaluate(self, run: dict, splits: tuple[str, ...]) -> dict[str, dict | None]:
        """Score ``run`` (or the base model when ``run["method"] == "base"``) on each of ``splits``: the ones not
        cached yet in one launch. Returns each split's summary, or None where the evaluation failed."""
        todo = [split for split in splits if not self.scored(run, split)]
        a = self.args
        if todo and not a.report_only:
            self._score(run, todo)
        return {split: run[split] if self.scored(run, split) else None for split in splits}

    def _score(self, run: dict, splits: list[str]) -> None:
        """One ``lorasb eval`` launch scoring ``run`` on ``splits``; the scores go to the run's record."""
        a = self.args
        if run["method"] != "base" and not os.path.isdir(os.path.join(REPO, run["output_dir"], "adapter")):
            # a run cached in an earlier sitting whose outputs are gone (another machine): train it again
            log(f"  {run['name']}: its adapter is gone; training it again to score it on {', '.join(splits)}")
            fresh = self.train(run["method"], run["lr"], run["seed"], again=True)
            fresh.update({k: run[k] for k in ("validation", "test", "test_seen") if k in run})
            run.clear()
            run.update(fresh)  # in place: the caller's record is this one
            self.store(run)
            if run["status"] != "ok":
                return
        outs = [rel(os.path.join(a.workdir, "eval", f"{run['name']}_{split}")) for split in splits]
        limits = [str(a.val_rows if split == "validation" else a.test_rows) for split in splits]
        args = ["--task", "gsm8k", "--data", *(self.split[split] for split in splits), "--model", self.model,
                "--out", *outs, "--prompt_template", "chat", "--max_new_tokens", str(a.max_new_tokens),
                "--batch_size", str(a.eval_batch), "--limit", *limits]
        if run["method"] != "base":
            args += ["--adapter", os.path.join(run["output_dir"], "adapter")]
        what = f"{run['name']} on {', '.join(splits)}"
        log_path = os.path.join(a.workdir, "logs", f"eval_{run['name']}_{'+'.join(splits)}.log")
        rc, seconds = launch("launch/evaluate.py", args, a.nproc, log_path)
        if rc != 0:
            log(f"  eval {what}: exit {rc}; log {rel(log_path)}\n{tail(log_path)}")
            return
        for split, out in zip(splits, outs):
            s = json.load(open(os.path.join(REPO, out, "summary.json")))
            gens = [json.loads(line) for line in open(os.path.join(REPO, out, "generations.jsonl"))]
            # seconds: the whole launch, shared by the splits it scored
            run[split] = {"strict": s["accuracy_strict"], "flexible": s["accuracy_flexible"], "rows": s["rows"],
                          "seconds": round(seconds, 1), "samples": [{"gold": g["gold"], "generation": g["generation"]}
                                                                    for g in gens[:3]]}
            if split == "test_seen":
                run[split]["data"] = self.test_seen_digest
            log(f"  eval {run['name']} on {split}: strict {s['accuracy_strict']:.3f}, flexible "
                f"{s['accuracy_flexible']:.3f} ({s['rows']} rows)")
        self.store(run)
        log(f"  eval {what}: {seconds:.0f} s")


# --------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int, scale: float = 1.0) -> str:
    if not values:
        return "n/a"
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def choose(runs: list[dict]) -> dict | None:
    """The sweep's winner on validation: strict accuracy, then flexible, then the lower final loss."""
    scored = [r for r in runs if r.get("status") == "ok" and r.get("validation")]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["validation"]["strict"], r["validation"]["flexible"], -r["final_loss"]))


def results_table(rows: list[dict]) -> str:
    lora = next((r["trainable"] for r in rows if r["method"] == "lora" and r.get("trainable")), None)
    lines = ["| method | r | trained numbers | vs LoRA | optimizer state | lr | seeds | strict % | flexible % | "
             "final loss | wall s / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "base":
            lines.append(f"| {LABELS['base']} | – | 0 | – | – | – | – | {fmt(r['strict'], 1, 100)} | "
                         f"{fmt(r['flexible'], 1, 100)} | – | – |")
            continue
        t = r.get("trainable")
        ratio = f"{t / lora:.3g}×" if t and lora else "n/a"
        state = f"{r['optimizer_state_bytes'] / 2**20:,.1f} MiB" if t else "n/a"
        lines.append(f"| {LABELS[r['method']]} | {r['r'] or '–'} | {f'{t:,}' if t else 'n/a'} | {ratio} | {state} | "
                     f"{r['lr']:g} | {len(r['strict'])} | {fmt(r['strict'], 1, 100)} | {fmt(r['flexible'], 1, 100)} | "
                     f"{fmt(r['final_loss'], 4)} | {fmt(r['seconds'], 0)} |")
    return "\n".join(lines)


def split_table(rows: dict[str, dict]) -> str:
    """Strict and flexible accuracy per method on one split, with each seed's strict score."""
    lines = ["| method | seeds | strict % | flexible % | strict % per seed |", "|---|---|---|---|---|"]
    for m, r in rows.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in r["strict"])
        lines.append(f"| {LABELS[m]} | {len(r['strict']) if m != 'base' else '–'} | {fmt(r['strict'], 1, 100)} | "
                     f"{fmt(r['flexible'], 1, 100)} | {per_seed} |")
    return "\n".join(lines)


def sweep_table(sweeps: dict[str, list[dict]], chosen: dict[str, dict]) -> str:
    lines = ["| method | lr | validation strict % | validation flexible % | final loss | chosen |",
             "|---|---|---|---|---|---|"]
    for method, runs in sweeps.items():
        for r in runs:
            v = r.get("validation")
            cells = (f"{100 * v['strict']:.1f} | {100 * v['flexible']:.1f}" if v else "n/a | n/a")
            loss = f"{r['final_loss']:.4f}" if r.get("status") == "ok" else r.get("status", "pending")
            lines.append(f"| {LABELS[method]} | {r['lr']:g} | {cells} | {loss} | "
                         f"{'yes' if chosen.get(method) is r else ''} |")
    return "\n".join(lines)


def early_lead(curves_by_method: dict[str, list[list]], upto: int = 10) -> dict[str, float]:
    """Mean training loss over steps 1..``upto`` per method (mean over its seeds' curves)."""
    out = {}
    for method, curves in curves_by_method.items():
        values = [loss for c in curves for step, loss in c if step <= upto]
        if values:
            out[method] = statistics.fmean(values)
    return out


def claims(rows: dict[str, dict], early: dict[str, float], split: str = "test") -> list[str]:
    """The plain statements (i)-(iii) on ``split``'s strict accuracy in ``rows``, each with its numbers, or
    why it cannot be said yet."""
    def acc(m):
        return statistics.fmean(rows[m]["strict"]) * 100 if m in rows and rows[m]["strict"] else None

    def spread(m):
        return statistics.stdev(rows[m]["strict"]) * 100 if m in rows and len(rows[m]["strict"]) > 1 else None

    out = []
    sb, xs, lora = acc("lorasb"), acc("loraxs"), acc("lora")
    if sb is None or xs is None:
        out.append("(i) LoRA-SB vs LoRA-XS at the same trained count: not measured yet.")
    else:
        out.append(f"(i) LoRA-SB ≥ LoRA-XS at the same trained count, on {split}: {'yes' if sb >= xs else 'no'} "
                   f"(strict {sb:.1f}% ± {spread('lorasb') or 0:.1f} against {xs:.1f}% ± {spread('loraxs') or 0:.1f}).")
    if sb is None or lora is None:
        out.append("(ii) LoRA-SB vs LoRA r = 32: not measured yet.")
    else:
        fewer = rows["lora"]["trainable"] / rows["lorasb"]["trainable"]
        ok = sb >= lora - 1.0 and fewer >= 5
        out.append(f"(ii) LoRA-SB within 1 point of LoRA r = 32 or above it, with ≥ 5× fewer trained numbers, "
                   f"on {split}: "
                   f"{'yes' if ok else 'no'} (strict {sb:.1f}% against {lora:.1f}%, {fewer:.1f}× fewer).")
    if "lorasb" in early and len(early) > 1:
        others = {m: v for m, v in early.items() if m in METHODS and m != "lorasb"}
        leads = all(early["lorasb"] < v for v in others.values())
        text = ", ".join(f"{LABELS[m]} {v:.3f}" for m, v in others.items())
        out.append(f"(iii) LoRA-SB's loss leads early (mean loss of steps 1-10): {'yes' if leads else 'no'} "
                   f"(LoRA-SB {early['lorasb']:.3f}; {text}).")
    else:
        out.append("(iii) LoRA-SB's early loss: not measured yet.")
    for variant in VARIANTS:
        v = acc(variant)
        if v is not None:
            lead = f", early loss {early[variant]:.3f}" if variant in early else ""
            out.append(f"({LABELS[variant]}: strict {v:.1f}% ± {spread(variant) or 0:.1f}{lead}.)")
    return out


def machine() -> dict:
    import torch

    return {"cpu": common.cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": version("torch"), "deepspeed": version("deepspeed"),
            "transformers": version("transformers"), "accelerator": "cuda" if torch.cuda.is_available() else "cpu"}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.steps = args.methods or "lorasb,lora", args.seeds.split(",")[0], min(args.steps, 4)
        args.est_samples, args.val_rows, args.test_rows = args.est_samples or 6, 4, args.test_rows or 8
        args.max_new_tokens = min(args.max_new_tokens, 32)
        args.lr = args.lr or ["lorasb=3e-3", "lora=1e-3"]
    quick_dir = os.path.join(REPO, "outputs", "quality-quick")
    args.workdir = args.workdir or (quick_dir if args.quick else os.path.join(REPO, "outputs", "quality"))
    args.results = args.results or (os.path.join(quick_dir, "results") if args.quick else
                                    os.path.join(REPO, "bench", "results", "quality"))
    started = time.time()
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    if not methods or any(m not in ROWS for m in methods):
        raise SystemExit(f"--methods {args.methods}: choose from {', '.join(ROWS)}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"--model {rel(args.model)}: no model there; write it once with "
                         f"`lorasb fetch smollm2-135m-instruct --out {rel(args.model)}`")
    lrs = {m: SWEEP_LR[m] for m in methods} | {m: v for m, v in parse_lrs(args.lr).items() if m in methods}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.workdir, args.results = os.path.abspath(args.workdir), os.path.abspath(args.results)
    command = shlex.join(["python", "bench/quality.py", *argv])
    log(f"[quality] {command}")
    study = Study(args)
    log(f"[quality] model {study.model}; data {rel(args.data)}; {args.steps} steps per run; seeds {seeds}; lrs {lrs}")

    rows, sweeps, chosen, failed, pending = {}, {}, {}, [], []
    if not args.no_base:
        base = study.cached("base") or {"name": "base", "key": study.key, "method": "base"}
        log("[quality] base model, zero-shot")
        scores = study.evaluate(base, ("test", "test_seen"))
        test, seen = scores["test"], scores["test_seen"]
        if test:
            rows["base"] = {"method": "base", "strict": [test["strict"]], "flexible": [test["flexible"]],
                            "seen_strict": [seen["strict"]] if seen else [],
                            "seen_flexible": [seen["flexible"]] if seen else []}
        (pending if args.report_only else failed).extend([] if test else ["base"])
        failed.extend([] if seen or args.report_only else ["base (test_seen)"])
    for method in methods:
        log(f"[quality] {method}: sweep {lrs[method]} on seed {seeds[0]}")
        sweep = [study.train(method, lr, seeds[0]) for lr in lrs[method]]
        # the test splits wait for the choice on validation; a sweep of one lr has chosen already, and its run
        # is scored on all three in one launch
        splits = ("validation",) if len(sweep) > 1 else ("validation", "test", "test_seen")
        for run in sweep:
            if run["status"] == "ok" and study.evaluate(run, splits)["validation"] is None \
                    and not args.report_only:
                failed.append(run["name"])
        sweeps[method] = sweep
        failed += [r["name"] for r in sweep if r["status"] == "failed"]
        if any(r["status"] == "pending" or (r["status"] == "ok" and "validation" not in r) for r in sweep):
            pending.append(method)
            continue
        best = choose(sweep)
        if best is None:
            continue
        chosen[method] = best
        kept = [best] + [study.train(method, best["lr"], s) for s in seeds[1:]]
        for run in kept:
            if run["status"] == "ok" and not args.report_only \
                    and None in study.evaluate(run, ("test", "test_seen")).values():
                failed.append(run["name"])
        failed += [r["name"] for r in kept if r["status"] == "failed"]
        if any(r["status"] == "pending" or (r["status"] == "ok" and "test" not in r) for r in kept):
            pending.append(method)
            continue
        done = [r for r in kept if r.get("test")]
        seen = [r["test_seen"] for r in kept if r.get("test_seen", {}).get("data") == study.test_seen_digest]
        rows[method] = {"method": method, "r": RANKS[method], "lr": best["lr"], "trainable": best["trainable"],
                        "optimizer_state_bytes": best["optimizer_state_bytes"],
                        "strict": [r["test"]["strict"] for r in done], "flexible": [r["test"]["flexible"] for r in done],
                        "seen_strict": [v["strict"] for v in seen], "seen_flexible": [v["flexible"] for v in seen],
                        "final_loss": [r["final_loss"] for r in kept if r["status"] == "ok"],
                        "seconds": [r["train_seconds"] for r in kept if r["status"] == "ok"],
                        "runs": [r["name"] for r in kept], "curves": [r["curve"] for r in kept if r["status"] == "ok"]}

    early = early_lead({m: r["curves"] for m, r in rows.items() if m != "base"})
    table = results_table(list(rows.values()))
    statements = claims(rows, early)
    seen_rows = {m: dict(r, strict=r["seen_strict"], flexible=r["seen_flexible"]) for m, r in rows.items()
                 if r.get("seen_strict")}
    seen_table = split_table(seen_rows)
    seen_statements = [line for line in claims(seen_rows, {}, "test_seen") if not line.startswith("(iii)")]
    test_rows = args.test_rows or sum(1 for _ in open(study.split["test"]))
    m = machine()
    header = (f"Quality study on {study.model}: {test_rows} held-out test problems (unseen templates and names), "
              f"{args.steps} steps per run, global batch {_global_batch(args.nproc)}, {args.nproc} processes, "
              f"ZeRO-3, fp32; lr chosen on {args.val_rows} validation problems; mean ± sample std over seeds "
              f"{seeds}")
    if pending:
        header += f". Not finished yet, so left out: {', '.join(LABELS.get(m, m) for m in pending)}"
    seen_count = args.test_rows or sum(1 for _ in open(study.split["test_seen"]))
    seen_header = (f"The same runs on {seen_count} held-out problems of the training stories (test_seen: training "
                   "templates and names, new numbers, no question of the other splits):")
    report = "\n\n".join([header, table, "\n".join(statements), seen_header, seen_table, "\n".join(seen_statements),
                          "Learning-rate sweep (seed %d):" % seeds[0], sweep_table(sweeps, chosen),
                          f"Machine: {m['cpu']} ({m['cores']} cores), {m['accelerator']}; Python {m['python']}, torch "
                          f"{m['torch']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}",
                          f"Command: {command}; this sitting: {(time.time() - started) / 60:.1f} min"])
    log("")
    log(report)
    os.makedirs(args.results, exist_ok=True)
    payload = {"command": command, "machine": m, "settings": study.key | {"seeds": seeds, "lrs": lrs},
               "rows": rows, "chosen": {k: v["name"] for k, v in chosen.items()},
               "sweeps": {k: [r["name"] for r in v] for k, v in sweeps.items()},
               "energy": next((r.get("energy") for r in [chosen.get("lorasb")] if r), None),
               "early_loss": early, "claims": statements, "table": table, "pending": pending,
               "test_seen": {"table": seen_table, "claims": seen_statements}}
    for name, text in (("quality.json", json.dumps(payload, indent=1)), ("quality.md", report + "\n")):
        with open(os.path.join(args.results, name), "w") as f:
            f.write(text)
    try:
        import plot  # bench/plot.py; needs matplotlib (the bench extra)

        log(f"[quality] figure: {rel(plot.plot(payload, os.path.join(args.results, 'quality.png')))}")
    except ImportError as e:
        log(f"[quality] no figure ({e}); pip install -e '.[bench]'")
    log(f"[quality] written to {rel(args.results)}")
    if args.write_docs:
        figure = rel(os.path.join(args.results, "quality.png"))
        summary = "\n\n".join([header, table, "\n".join(statements), seen_header, seen_table,
                               "\n".join(seen_statements)])
        write_block(os.path.join(REPO, "README.md"), summary + f"\n\n![quality study]({figure})")
        write_block(os.path.join(REPO, "bench", "README.md"),
                    report + f"\n\n![quality study]({os.path.relpath(figure, 'bench')})")
        log("[quality] report written into README.md and bench/README.md")
    if failed:
        log(f"[quality] {len(failed)} run(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


DOCS_BEGIN, DOCS_END = "<!-- quality-report -->", "<!-- /quality-report -->"


def write_block(path: str, text: str) -> None:
    """Replace what stands between the report markers of ``path`` (markdown) with ``text``."""
    doc = open(path).read()
    head, begin, rest = doc.partition(DOCS_BEGIN)
    if not begin:
        raise SystemExit(f"{rel(path)}: no {DOCS_BEGIN} marker to write the report at")
    _, end, tail_text = rest.partition(DOCS_END)
    new = f"{head}{DOCS_BEGIN}\n{text}\n{DOCS_END}{tail_text if end else rest}"
    from lorasb_ds.files import atomic_write_text

    atomic_write_text(new, path)


def _global_batch(nproc: int) -> int:
    ds = json.load(open(DS_CONFIG))
    return ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * nproc


if __name__ == "__main__":
    sys.exit(main())
