"""Quality study: LoRA-SB against LoRA-XS, LoRA and full fine-tuning, trained and evaluated through the
product's own command line on a small pretrained model.

    python bench/quality.py                       # the shipped model, each method at its chosen lr, 1 seed
    python bench/quality.py --full --json bench/results/quality.json   # lr sweep, then 3 seeds at the best lr

What it does:

1. **Model**: the built-in ``lorasb_ds/assets/tiny-llama`` (a small Llama pretrained on equations,
   number facts and short stories by ``bench/pretrain.py``), or with ``--pretrain_steps N`` a model
   pretrained anew for N steps into ``WORKDIR/model``.
2. **Data**: fine-tuning on the built-in synthetic word problems, ``synthetic_math_rows(train_rows,
   train.seed)`` (Alpaca prompt, two steps, "... The answer is: N"), written to a metamath-format file
   in which every response starts with "Let's think step by step.", the cue that ``lorasb eval`` puts
   after "### Response:" (without it the models take the cue's final period for the end of the working
   and answer at once). A held-out test set in GSM8K format (``question``, ``answer`` ending
   ``#### N``) is written from the same generator with another seed, leaving out any question that is
   also in a training set of the study.
3. **Training**: every method through ``launch/train.py`` under ``torch.distributed.run`` with
   ``--nproc`` processes and ``ds_configs/zero3.json``, with ``bench/quality.yaml`` and overrides
   (``lorasb.method``, ``lorasb.r``, ``train.lr``, ``train.seed``, ``train.max_steps``), all methods for
   the same number of optimizer steps. With more than one lr for a method, each is trained on the first
   seed and the lr with the lowest final loss is kept (the test set plays no part in the choice); the
   other seeds are trained at that lr.
4. **Evaluation**: each kept run's adapter by ``launch/evaluate.py`` (``lorasb eval --task gsm8k``,
   greedy, sharded over the same number of processes): strict ("The answer is: N") and flexible (last
   number) exact match.
5. **Report**: a markdown table (printed, and in ``--json`` with every run's loss curve).

"Final loss" is the mean training loss of the last fifth of the steps (each step's loss is the mean
over its global batch), so one noisy batch does not decide it.
"""

from __future__ import annotations

import argparse
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
from lorasb_ds.init import read_init_metadata  # noqa: E402
from lorasb_ds.modeling import TINY_LLAMA_DIR  # noqa: E402

METHODS = ("lorasb", "loraxs", "lora", "full")
# The learning rates the default run uses: the best of the sweep of ``--full`` (bench/README.md).
DEFAULT_LR = {"lorasb": 2e-2, "loraxs": 1e-2, "lora": 1e-2, "full": 1e-3}
# The sweep of ``--full``.
SWEEP_LR = {"lorasb": [5e-3, 1e-2, 2e-2], "loraxs": [5e-3, 1e-2, 2e-2], "lora": [5e-3, 1e-2, 2e-2],
            "full": [3e-4, 1e-3, 3e-3]}
RUN_CONFIG = os.path.join(REPO, "bench", "quality.yaml")
DS_CONFIG = os.path.join(REPO, "ds_configs", "zero3.json")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- arguments


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    """``["lorasb=1e-3,3e-3", "full=1e-4"]`` -> ``{"lorasb": [0.001, 0.003], "full": [0.0001]}``."""
    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR[,LR...] with METHOD in {', '.join(METHODS)}")
        out[method] = [float(v) for v in values.split(",") if v.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--full", action="store_true",
                   help="the whole study: the lr sweep of every method (SWEEP_LR) and seeds 1,2,3, unless "
                        "--lr / --seeds say otherwise")
    p.add_argument("--model", default=TINY_LLAMA_DIR,
                   help="pretrained model directory (default: the built-in lorasb_ds/assets/tiny-llama)")
    p.add_argument("--pretrain_steps", type=int, default=0,
                   help="pretrain a model anew for this many steps (bench/pretrain.py, its other defaults) "
                        "into WORKDIR/model and use it instead of --model")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="learning rates of a method; several: a sweep on the first seed (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (default: 1; --full: 1,2,3)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (default: %(default)s)")
    p.add_argument("--train_rows", type=int, default=2000, help="training problems per seed (default: %(default)s)")
    p.add_argument("--r", type=int, default=32, help="rank of LoRA-SB and LoRA-XS (default: %(default)s)")
    p.add_argument("--lora_r", type=int, default=8, help="rank of LoRA (default: %(default)s)")
    p.add_argument("--est_samples", type=int, default=None,
                   help="lorasb.est_samples (default: the run config's)")
    p.add_argument("--eval_rows", type=int, default=150, help="held-out test problems (default: %(default)s)")
    p.add_argument("--test_seed", type=int, default=20240, help="seed of the test set (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="eval generation length (default: %(default)s)")
    p.add_argument("--eval_batch", type=int, default=25, help="eval prompts per generate call per rank "
                                                             "(default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="processes per training / evaluation (default: %(default)s)")
    p.add_argument("--workdir", default=os.path.join(REPO, "outputs", "quality"),
                   help="runs, logs and the test set (default: outputs/quality)")
    p.add_argument("--json", help="write every setting, run, loss curve and result to this file")
    return p


# --------------------------------------------------------------------------- data

def test_rows(n: int, seed: int, train_rows: int, train_seeds: list[int]) -> tuple[list[dict], int]:
    """``n`` GSM8K-style rows (``question``, ``answer`` ending ``#### N``) from the synthetic generator
    with ``seed``: no question twice, none that is in a training set (``train_rows`` rows of each of
    ``train_seeds``). Returns the rows and how many generated rows were left out."""
    from lorasb_ds.data import synthetic_math_rows

    seen = {row["query"] for s in train_seeds for row in synthetic_math_rows(train_rows, s)}
    rows, dropped = [], 0
    for row in synthetic_math_rows(2 * n + len(seen), seed):  # enough, unless the generator repeats a lot
        if row["query"] in seen:
            dropped += 1
            continue
        seen.add(row["query"])
        steps, _, answer = row["response"].rpartition(" The answer is: ")
        rows.append({"question": row["query"], "answer": f"{steps}\n#### {answer}"})
        if len(rows) == n:
            return rows, dropped
    raise SystemExit(f"could not draw {n} test problems with seed {seed} that are not training problems")


# --------------------------------------------------------------------------- processes


def launch(script: str, args: list[str], nproc: int, log_path: str) -> tuple[int, float, list[str]]:
    """``python -m torch.distributed.run --nproc_per_node N script args``; output to ``log_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(common.free_port()), script, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    with open(os.path.join(REPO, log_path), "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - started, cmd


def rel(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (commands run from there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def tail(path: str, n: int = 30) -> str:
    with open(os.path.join(REPO, path), errors="replace") as f:
        return "".join(f.readlines()[-n:])


# --------------------------------------------------------------------------- one run


def training_file(seed: int, args) -> str:
    """The training rows of ``seed`` (``synthetic_math_rows(train_rows, seed)``, the rows the built-in data
    would give) as a metamath-format file, each response starting with
    the cue that ``lorasb eval`` puts after "### Response:" (without it in training, a model takes the
    cue's final period for the end of its working and answers at once)."""
    from lorasb_ds.data import synthetic_math_rows
    from lorasb_ds.evaluate import COT_CUE

    path = os.path.join(args.workdir, "data", f"train_seed{seed}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in synthetic_math_rows(args.train_rows, seed):
            f.write(json.dumps({"query": row["query"], "response": f"{COT_CUE.strip()} {row['response']}"}) + "\n")
    return rel(path)


def rank_of(method: str, args) -> int:
    return args.lora_r if method == "lora" else args.r


def train(method: str, lr: float, seed: int, model: str, args) -> dict:
    out = rel(os.path.join(args.workdir, "runs", f"{method}_lr{lr:g}_seed{seed}"))
    overrides = [f"model.name_or_path={model}", f"lorasb.method={method}", f"lorasb.r={rank_of(method, args)}",
                 f"train.lr={lr:g}", f"train.seed={seed}", f"train.max_steps={args.steps}"]
    overrides.append(f"data.path={training_file(seed, args)}")
    if args.est_samples:
        overrides.append(f"lorasb.est_samples={args.est_samples}")
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    log_path = rel(os.path.join(args.workdir, "logs", f"train_{os.path.basename(out)}.log"))
    rc, seconds, cmd = launch("launch/train.py", ["--ds_config", os.path.relpath(DS_CONFIG, REPO), "--config",
                                                  os.path.relpath(RUN_CONFIG, REPO), "--output_dir", out,
                                                  "--overwrite", *overrides], args.nproc, log_path)
    run = {"method": method, "r": rank_of(method, args), "lr": lr, "seed": seed, "output_dir": out,
           "train_rc": rc, "train_seconds": round(seconds, 1), "train_log": log_path,
           "train_command": shlex.join(cmd[2:])}
    metrics = os.path.join(REPO, out, "metrics.jsonl")
    curve = []
    if os.path.isfile(metrics):
        curve = [(r["step"], r["loss"]) for r in map(json.loads, open(metrics)) if "step" in r]
    run["curve"] = curve
    if rc != 0 or not curve:
        run["status"] = "diverged" if rc == 3 else "failed"
        log(f"  {method} lr={lr:g} seed={seed}: exit {rc} ({run['status']}); log {log_path}\n{tail(log_path, 8)}")
        return run
    tail_n = max(1, len(curve) // 5)
    run["final_loss"] = statistics.fmean(loss for _, loss in curve[-tail_n:])
    summary = json.load(open(os.path.join(REPO, out, "run_summary.json")))
    run["trainable_parameters"] = summary["trainable_parameters"]
    run["status"] = "ok"
    if method == "lorasb":
        run["energy"] = read_init_metadata(os.path.join(REPO, out, "lorasb_init.safetensors"))["energy"]
    log(f"  {method} lr={lr:g} seed={seed}: final loss {run['final_loss']:.4f}, "
        f"{run['trainable_parameters']:,} trained, {seconds:.0f}s")
    return run


def evaluate(run: dict, model: str, test_path: str, args) -> None:
    out = os.path.join(run["output_dir"], "eval")
    log_path = rel(os.path.join(args.workdir, "logs", f"eval_{os.path.basename(run['output_dir'])}.log"))
    rc, seconds, cmd = launch("launch/evaluate.py", [
        "--task", "gsm8k", "--data", test_path, "--adapter", os.path.join(run["output_dir"], "adapter"),
        "--model", model, "--out", out, "--max_new_tokens", str(args.max_new_tokens),
        "--batch_size", str(args.eval_batch)], args.nproc, log_path)
    run.update(eval_rc=rc, eval_seconds=round(seconds, 1), eval_log=log_path, eval_command=shlex.join(cmd[2:]))
    if rc != 0:
        run["status"] = "eval failed"
        log(f"  eval of {os.path.basename(run['output_dir'])}: exit {rc}; log {log_path}\n{tail(log_path, 8)}")
        return
    s = json.load(open(os.path.join(REPO, out, "summary.json")))
    run.update(accuracy_strict=s["accuracy_strict"], accuracy_flexible=s["accuracy_flexible"],
               correct_strict=s["correct_strict"], correct_flexible=s["correct_flexible"], eval_rows=s["rows"],
               no_prediction_strict=s["no_prediction_strict"])
    gens = [json.loads(line) for line in open(os.path.join(REPO, out, "generations.jsonl"))]
    run["sample_generations"] = [{"gold": g["gold"], "generation": g["generation"]} for g in gens[:3]]
    log(f"  eval {os.path.basename(run['output_dir'])}: strict {s['accuracy_strict']:.3f}, "
        f"flexible {s['accuracy_flexible']:.3f} ({s['rows']} rows, {seconds:.0f}s)")


# --------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int, percent: bool = False) -> str:
    if not values:
        return "n/a"
    scale = 100.0 if percent else 1.0
    m, s = mean_std([v * scale for v in values])
    text = f"{m:.{digits}f}"
    return text + (f" ± {s:.{digits}f}" if s is not None else "")


def table(results: list[dict]) -> str:
    lora = next((r["trainable"] for r in results if r["method"] == "lora" and r["trainable"]), None)
    lines = ["| method | r | trainable params | vs LoRA | best lr | seeds | strict acc % | flexible acc % | "
             "final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['trainable'] / lora:.3g}x" if lora and r["trainable"] else "n/a"
        r_text = "-" if r["method"] == "full" else str(r["r"])
        trainable = f"{r['trainable']:,}" if r["trainable"] else "n/a"
        lines.append(f"| {r['method']} | {r_text} | {trainable} | {ratio} | {r['lr']:g} | {len(r['strict'])} | "
                     f"{fmt(r['strict'], 1, True)} | {fmt(r['flexible'], 1, True)} | {fmt(r['final_loss'], 4)} |")
    return "\n".join(lines)


def sweep_table(sweeps: dict[str, list[dict]]) -> str:
    lines = ["| method | lr | final loss (first seed) | chosen |", "|---|---|---|---|"]
    for method, runs in sweeps.items():
        ok = [r for r in runs if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["final_loss"]) if ok else None
        for r in runs:
            loss = f"{r['final_loss']:.4f}" if r["status"] == "ok" else r["status"]
            lines.append(f"| {method} | {r['lr']:g} | {loss} | {'yes' if r is best else ''} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    return {"cpu": common.cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": version("torch"), "deepspeed": version("deepspeed"),
            "transformers": version("transformers"), "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} ({m['cores']} cores), {m['accelerator']}; {m['platform']}; Python {m['python']}, "
            f"torch {m['torch']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}; {m['date']}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    started = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    lrs = {m: list(SWEEP_LR[m] if args.full else [DEFAULT_LR[m]]) for m in methods}
    lrs.update({m: v for m, v in parse_lrs(args.lr).items() if m in methods})
    seeds = [int(s) for s in (args.seeds or ("1,2,3" if args.full else "1")).split(",") if s.strip()]
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    command = shlex.join(["python", "bench/quality.py", *argv])
    log(f"[quality] {command}")

    model = os.path.abspath(args.model)
    pretrain_summary = None
    if args.pretrain_steps:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from pretrain import pretrain

        model = os.path.join(args.workdir, "model")
        pretrain_summary = pretrain(model, steps=args.pretrain_steps, log_every=max(1, args.pretrain_steps // 5),
                                    corpus_size=min(300_000, 2000 * args.pretrain_steps))
    elif not os.path.isfile(os.path.join(model, "config.json")):
        raise SystemExit(f"--model {args.model}: no pretrained model there (config.json missing)")
    model_arg = rel(model)

    test, dropped = test_rows(args.eval_rows, args.test_seed, args.train_rows, seeds)
    test_path = rel(os.path.join(args.workdir, "gsm8k_test.jsonl"))
    with open(os.path.join(REPO, test_path), "w") as f:
        for row in test:
            f.write(json.dumps(row) + "\n")
    log(f"[quality] model {model_arg}; test set {len(test)} rows (seed {args.test_seed}; {dropped} left out as "
        f"training questions); {args.steps} steps per run; seeds {seeds}; lrs {lrs}")

    runs, sweeps, results = [], {}, []
    for method in methods:
        log(f"[quality] {method}")
        first = [train(method, lr, seeds[0], model_arg, args) for lr in lrs[method]]
        runs += first
        ok = [r for r in first if r["status"] == "ok"]
        if len(lrs[method]) > 1:
            sweeps[method] = first
        if not ok:
            results.append({"method": method, "r": rank_of(method, args), "lr": lrs[method][0], "trainable": None,
                            "strict": [], "flexible": [], "final_loss": [], "runs": []})
            continue
        best = min(ok, key=lambda r: r["final_loss"])
        kept = [best] + [train(method, best["lr"], s, model_arg, args) for s in seeds[1:]]
        runs += kept[1:]
        for run in kept:
            if run["status"] == "ok":
                evaluate(run, model_arg, test_path, args)
        evaluated = [r for r in kept if "accuracy_strict" in r]
        results.append({"method": method, "r": rank_of(method, args), "lr": best["lr"],
                        "trainable": best["trainable_parameters"],
                        "strict": [r["accuracy_strict"] for r in evaluated],
                        "flexible": [r["accuracy_flexible"] for r in evaluated],
                        "final_loss": [r["final_loss"] for r in kept if "final_loss" in r],
                        "runs": [os.path.basename(r["output_dir"]) for r in kept]})

    m = machine()
    seconds = time.time() - started
    report = table(results)
    log("")
    log(f"Quality study: {len(test)} held-out problems, {args.steps} steps per run (global batch "
        f"{_global_batch(args.nproc)}), {args.nproc} processes, ZeRO-3; accuracy and final loss: mean ± sample "
        f"std over seeds {seeds}")
    log("")
    log(report)
    if sweeps:
        log("")
        log("Learning-rate sweep (seed %d; the lowest final loss is chosen):" % seeds[0])
        log("")
        log(sweep_table(sweeps))
    log("")
    log(f"Machine: {machine_line(m)}")
    log(f"Command: {command}")
    log(f"Wall time: {seconds / 60:.1f} min")
    if args.json:
        payload = {"command": command, "machine": m, "seconds": round(seconds, 1),
                   "settings": {k: v for k, v in vars(args).items() if k != "json"} | {
                       "seeds": seeds, "lrs": lrs, "model": model_arg, "workdir": rel(args.workdir)},
                   "test_set": {"path": test_path, "rows": len(test), "seed": args.test_seed,
                                "left_out_as_training_questions": dropped},
                   "pretrain": pretrain_summary, "results": results, "runs": runs, "table": report,
                   "sweep_table": sweep_table(sweeps) if sweeps else None}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        log(f"[quality] written to {args.json}")
    # a run that diverged is an outcome of the sweep; one that crashed (training or evaluation) is not
    crashed = [r for r in runs if r["status"] in ("failed", "eval failed")]
    if crashed:
        log(f"[quality] {len(crashed)} run(s) failed: " + ", ".join(os.path.basename(r["output_dir"]) for r in crashed))
    return 1 if crashed else 0


def _global_batch(nproc: int) -> int:
    ds = json.load(open(DS_CONFIG))
    return ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * nproc


if __name__ == "__main__":
    sys.exit(main())
