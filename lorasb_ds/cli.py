"""The ``lorasb`` command.

``lorasb train --ds_config ds_configs/zero3.json [--config run.yaml] [key=value ...]``
``lorasb export --adapter OUT/adapter --out DIR [--base_model NAME]``   (a stock PEFT LoRA adapter)
``lorasb merge --base_model DIR --adapter OUT/adapter --out DIR``      (W0 + B R A, shard by shard)
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_ds_config, load_run_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorasb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="estimate B, A, R and train R on a DeepSpeed engine")
    train.add_argument("--ds_config", required=True, help="DeepSpeed JSON (batch sizes, ZeRO, precision)")
    train.add_argument("--config", help="run config YAML (model, lorasb, data, train sections)")
    train.add_argument("--init_file", help="reuse B, A, R of an earlier run and skip the estimation")
    train.add_argument("--output_dir", help="shorthand for train.output_dir=...")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from the newest complete checkpoint of output_dir, or from PATH")
    train.add_argument("--overwrite", action="store_true", help="start anew in an output_dir holding a run")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override run-config settings, e.g. lorasb.r=32 train.lr=1e-3")
    export = sub.add_parser("export", help="write a trained adapter as a PEFT LoRA adapter")
    export.add_argument("--adapter", required=True, help="the adapter/ directory written by `lorasb train`")
    export.add_argument("--out", required=True,
                        help="directory for adapter_model.safetensors and adapter_config.json")
    export.add_argument("--base_model", help="base_model_name_or_path to record (default: the training model)")
    merge = sub.add_parser("merge", help="write a copy of the base checkpoint with the adapter merged in")
    merge.add_argument("--base_model", required=True, help="local checkpoint directory (safetensors shards)")
    merge.add_argument("--adapter", required=True, help="the adapter/ directory written by `lorasb train`")
    merge.add_argument("--out", required=True, help="new (or empty) directory for the merged checkpoint")
    return parser


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
    except ConfigError as e:
        print(f"lorasb: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"lorasb: stopped: {e}", file=sys.stderr)
        return 3
    return 0


def train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    for flag, key in (("init_file", "train.init_file"), ("output_dir", "train.output_dir"),
                      ("resume", "train.resume")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    cfg = load_run_config(args.config, overrides)
    ds_config = load_ds_config(args.ds_config)
    from .train import run  # DeepSpeed is imported only for training

    run(cfg, ds_config)


if __name__ == "__main__":
    sys.exit(main())
