"""The ``lorasb`` command. ``lorasb train --ds_config ds_configs/zero3.json [--config run.yaml] [key=value ...]``."""

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
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override run-config settings, e.g. lorasb.r=32 train.lr=1e-3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.init_file:
        overrides.append(f"train.init_file={args.init_file}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    try:
        cfg = load_run_config(args.config, overrides)
        ds_config = load_ds_config(args.ds_config)
        from .train import run

        run(cfg, ds_config)
    except ConfigError as e:
        print(f"lorasb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
