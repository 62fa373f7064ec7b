"""How a lorasb process ends (cli.entry, cli.exit_process): with the code it was given, after its threads
that are not daemons and the atexit functions, with its output flushed, and without the rest of the
interpreter's shutdown."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

PROGRAM = """
import atexit, sys, threading, time
from lorasb_ds.cli import exit_process
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.5), sys.stdout.write("thread done, "))).start()
sys.stdout.write("not flushed yet, ")
exit_process({code!r})
"""


@pytest.mark.parametrize("code,returncode,printed", [(0, 0, ""), (75, 75, ""), (None, 0, ""),
                                                     ("stopped: why", 1, "stopped: why\n"), (["x"], 1, "['x']\n")])
def test_exit_process_runs_atexit_flushes_and_ends_with_the_code(code, returncode, printed):
    proc = subprocess.run([sys.executable, "-c", PROGRAM.format(code=code)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == returncode, proc.stderr
    assert proc.stdout == "not flushed yet, thread done, atexit ran\n"
    assert proc.stderr == printed


@pytest.mark.parametrize("args,returncode,said", [
    (["--help"], 0, "usage: lorasb train"),  # argparse's SystemExit(0)
    (["--ds_config", "no-such.json"], 2, "lorasb: error: "),  # a ConfigError: main's 2
    (["--ds_config"], 2, "usage: lorasb train"),  # a usage error: argparse's SystemExit(2)
])
def test_launch_script_ends_with_the_commands_code(args, returncode, said):
    proc = subprocess.run([sys.executable, os.path.join("launch", "train.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    assert said in proc.stdout + proc.stderr
