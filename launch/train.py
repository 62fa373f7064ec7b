"""Entry point for launchers: ``deepspeed launch/train.py --ds_config ds_configs/zero3.json [...]``.

Arguments are those of ``lorasb train`` (see ``lorasb train --help``).
"""

import sys

from lorasb_ds.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
