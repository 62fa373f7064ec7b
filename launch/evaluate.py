"""Entry point for launchers: ``torchrun --nproc_per_node 8 launch/evaluate.py --task gsm8k [...]``.

Arguments are those of ``lorasb eval`` (see ``lorasb eval --help``). Runs with plain ``python`` too
(one process). Every rank evaluates its share of the rows; rank 0 writes the results.
"""

import sys

from lorasb_ds.cli import entry

if __name__ == "__main__":
    entry(["eval", *sys.argv[1:]])
