"""One 2-process CPU training started by every supported launcher gives the same adapter.

torchrun (the reference), the deepspeed runner, mpirun (mpi4py discovery), and a real single-node
Slurm running the project's own sbatch scripts unchanged: train_torchrun.sbatch, and
train_srun.sbatch preempted by the USR1 Slurm sends before a time limit (checkpoint, exit 75,
requeue, resume). A rank that fails ends the job promptly under torchrun, deepspeed and mpirun, and
a rank killed mid-training ends the job of train_srun.sbatch.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, deepspeed_cmd, mpirun_cmd, torchrun_cmd

pytestmark = pytest.mark.slow

RUN = ["--ds_config", "ds_configs/zero3.json", "data.builtin_size=200", "train.max_steps=3",
       "lorasb.est_samples=6"]
ADAPTER = os.path.join("adapter", "lorasb_adapter.safetensors")
TIMEOUT = 420  # per command; generous: other jobs may share the CPUs
BITWISE = {}  # launcher -> whether its adapter equals the reference bit for bit (printed at the end)


def env(**extra) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run(cmd, timeout=TIMEOUT, check=True, **env_extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-8000:]}")
    return proc


def check_run(out, proc_output: str, launcher: str):
    assert os.path.isfile(os.path.join(out, ADAPTER)), proc_output[-4000:]
    summary = json.load(open(os.path.join(out, "run_summary.json")))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert f"[lorasb] ranks: launcher={launcher}, world=2" in proc_output, proc_output[-4000:]


def assert_same_adapter(out, reference, launcher: str):
    a = load_file(os.path.join(reference, ADAPTER))
    b = load_file(os.path.join(out, ADAPTER))
    assert a.keys() == b.keys() and len(a) == 28
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"{launcher}: R differs from torchrun's by up to {worst:.3g}"
    BITWISE[launcher] = all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def report_bitwise():
    yield
    if BITWISE:
        print("\nadapters bitwise equal to torchrun's: " + ", ".join(f"{k}={v}" for k, v in BITWISE.items()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    proc = run(torchrun_cmd("launch/train.py", *RUN, "--output_dir", str(out)))
    check_run(out, proc.stdout, "torchrun")
    return out


def test_torchrun_reference(reference):
    assert os.path.isfile(os.path.join(reference, ADAPTER))


def test_a_20_step_torchrun_run_prints_few_warnings(tmp_path):
    """torch's deprecation warnings about DeepSpeed's collectives must not print on every step of every rank
    (20 steps of 2 ranks: one such warning a step would print 20 lines or more)."""
    proc = run(torchrun_cmd("launch/train.py", "--ds_config", "ds_configs/zero3.json", "data.builtin_size=200",
                            "train.max_steps=20", "lorasb.est_samples=6", "--output_dir", str(tmp_path)))
    output = proc.stdout  # stderr merged in
    assert "[lorasb] adapter written to" in output
    warning_lines = [line for line in output.splitlines() if "warning" in line.lower()]
    assert len(warning_lines) <= 10, "\n".join(warning_lines[:20])


def test_a_plan_and_an_error_print_once_for_the_launch(tmp_path):
    """Every rank computes the same dry-run plan and hits the same bad setting: each is printed once."""
    proc = run(torchrun_cmd("launch/train.py", "--ds_config", "ds_configs/zero3.json", "--dry_run",
                            "--output_dir", str(tmp_path / "dry")))
    assert proc.stdout.count('"dry_run": true') == 1 and proc.stdout.count("W0 shard") == 1
    assert not (tmp_path / "dry").exists()
    proc = run(torchrun_cmd("launch/train.py", "--ds_config", "ds_configs/zero3.json", "lorasb.r=1000",
                            "--output_dir", str(tmp_path / "bad")), check=False)
    assert proc.returncode != 0 and proc.stdout.count("lorasb: error: lorasb.r = 1000 exceeds") == 1
    proc = run(torchrun_cmd("launch/train.py", "--ds_config"), check=False)
    assert proc.returncode != 0 and proc.stdout.count("usage: lorasb train") == 1


def test_deepspeed_runner_gives_the_same_adapter(reference, tmp_path):
    proc = run(deepspeed_cmd("launch/train.py", *RUN, "--output_dir", str(tmp_path)))
    check_run(tmp_path, proc.stdout, "deepspeed")
    assert_same_adapter(tmp_path, reference, "deepspeed")


def test_mpirun_gives_the_same_adapter(reference, tmp_path):
    proc = run(mpirun_cmd("launch/train.py", *RUN, "--output_dir", str(tmp_path)))
    check_run(tmp_path, proc.stdout, "mpi")
    assert "master=127.0.0.1:" in proc.stdout  # one host: loopback, not `hostname -I`
    assert proc.stdout.count("[lorasb] data: ") == 1  # no rank number before the group starts: said once
    assert_same_adapter(tmp_path, reference, "mpirun")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_a_failing_rank_ends_every_rank(launcher):
    cmd = {"torchrun": torchrun_cmd, "deepspeed": deepspeed_cmd, "mpirun": mpirun_cmd}[launcher](
        "tests/workers/fail_worker.py")
    # The worker's collectives time out after 10 minutes: ending well before means the failure did it.
    proc = run(cmd, timeout=180, check=False)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "boom on rank 1" in proc.stdout
    assert "passed the barrier" not in proc.stdout


# --------------------------------------------------------------- rank discovery, in process

SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}


def test_srun_tasks_map_to_ranks_and_a_per_job_port(monkeypatch):
    from lorasb_ds import ranks

    assert ranks.detect_launcher(SRUN_TASK) == "srun"
    assert ranks.world_size_from_env(SRUN_TASK) == 4  # the step's tasks, not the job's
    layout = ranks.discover(SRUN_TASK)
    assert (layout.rank, layout.world_size, layout.local_rank, layout.local_world_size) == (3, 4, 1, 2)
    assert layout.master_port == 20000 + 4242 % 20000
    monkeypatch.setattr(ranks.shutil, "which", lambda name: None)  # no scontrol: the list is read here
    assert ranks.discover(SRUN_TASK).master_addr == "gpu07"
    assert ranks.discover(dict(SRUN_TASK, SLURM_STEP_NUM_NODES="1")).master_addr == "127.0.0.1"
    assert ranks.discover(dict(SRUN_TASK, MASTER_ADDR="h0", MASTER_PORT="1234")).master_addr == "h0"
    assert ranks.first_host_of("rack[1-2]-n[03,05],login1") == "rack1-n03"
    unreadable = dict(SRUN_TASK, SLURM_STEP_NODELIST="gpu[07")
    assert ranks.discover(unreadable).master_addr == "10.0.0.7"  # SLURM_LAUNCH_NODE_IPADDR
    env = {}
    ranks.discover(SRUN_TASK).export(env)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}


def test_the_innermost_launcher_wins():
    from lorasb_ds import ranks

    torchrun_in_srun = dict(SRUN_TASK, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4",
                            MASTER_ADDR="gpu07", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="4242")
    assert ranks.detect_launcher(torchrun_in_srun) == "torchrun"
    assert ranks.discover(torchrun_in_srun).rank == 5
    batch_step = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert ranks.detect_launcher(batch_step) == "single"  # python run in the batch script itself
    assert "srun" in ranks.discover(batch_step).note
    assert ranks.detect_launcher(dict(batch_step, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1")) == "mpi"


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "RANK=2 but WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "0"}, "RANK=0 is set but WORLD_SIZE is not"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     "LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK is not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one'"),
    (dict(SRUN_TASK, SLURM_LOCALID="2"), "SLURM_LOCALID=2 but SLURM_STEP_TASKS_PER_NODE=2"),
    (dict(SRUN_TASK, SLURM_PROCID="4"), "SLURM_PROCID=4 but SLURM_STEP_NUM_TASKS=4"),
])
def test_inconsistent_launch_variables_fail_before_any_rendezvous(variables, message):
    from lorasb_ds import ranks
    from lorasb_ds.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        ranks.world_size_from_env(variables)
        ranks.discover(variables)


def test_an_mpi_launch_without_mpi4py_says_what_to_install(monkeypatch):
    from lorasb_ds import ranks
    from lorasb_ds.config import ConfigError

    monkeypatch.setattr(ranks, "_mpi4py_available", lambda: False)
    mpirun = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    for call in (ranks.world_size_from_env, ranks.discover):
        with pytest.raises(ConfigError, match=re.escape("pip install 'lorasb-ds[mpi]'")):
            call(mpirun)
    # srun --mpi=pmi2 without mpi4py: the step's own Slurm variables describe the same layout
    pmi2 = dict(SRUN_TASK, PMI_RANK="3", PMI_SIZE="4")
    assert ranks.world_size_from_env(pmi2) == 4 and ranks.discover(pmi2).rank == 3


def test_a_bad_launch_ends_the_run_at_once_with_the_reason(tmp_path):
    proc = run([sys.executable, "launch/train.py", *RUN, "--output_dir", str(tmp_path)], check=False, timeout=300,
               RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "lorasb: error: RANK=2 but WORLD_SIZE=2" in proc.stdout


# ------------------------------------------------------------------------------ a real Slurm

@pytest.fixture(scope="module")
def slurm():
    """A single-node Slurm on this machine (installed by the script if missing); stopped at the end."""
    script = os.path.join(REPO, "slurm", "local_cluster.sh")
    start = time.time()
    proc = subprocess.run([script, "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run([script, "stop"], capture_output=True, timeout=120)
        pytest.fail(f"slurm/local_cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"\nlocal Slurm up in {time.time() - start:.1f}s")
    yield
    proc = subprocess.run([script, "stop"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch(script: str, name: str, log_dir, options=(), args=(), **env_extra) -> subprocess.Popen:
    """Submit a project script unchanged: CPU overrides on the sbatch line and in the environment."""
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={log_dir}/%x-%j.out", "--gpus-per-node=0",
           *options, script, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(PYTHON=sys.executable, **env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_log(log_dir, name: str) -> str:
    logs = [f for f in os.listdir(log_dir) if f.startswith(name)]
    assert len(logs) == 1, logs
    with open(os.path.join(log_dir, logs[0])) as f:
        return f.read()


def finish(proc: subprocess.Popen, log_dir, name: str) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name])
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"sbatch --wait did not return:\n{out}\n{job_log(log_dir, name)[-6000:]}")
    log = job_log(log_dir, name)
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {out}\n{log[-8000:]}"
    return log


def test_slurm_torchrun_sbatch(slurm, reference, tmp_path):
    out, name = tmp_path / "run", f"lorasb-test-torchrun-{uuid.uuid4().hex[:8]}"
    proc = sbatch("slurm/train_torchrun.sbatch", name, tmp_path, args=RUN[2:],  # overrides as script arguments
                  GPUS_PER_NODE="2", OUTPUT_DIR=str(out), DIST_TIMEOUT_MINUTES="5")
    log = finish(proc, tmp_path, name)
    assert "[slurm] launch: srun" in log and "--rdzv_backend=c10d" in log
    assert "train.dist_timeout_minutes=5" in log
    check_run(out, log, "torchrun")
    assert_same_adapter(out, reference, "slurm torchrun")


def test_slurm_srun_sbatch_preempted_requeued_and_resumed(slurm, reference, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends) -> tasks checkpoint, exit 75 ->
    the script requeues the job -> the next start resumes and finishes with the same adapter."""
    out, name = tmp_path / "run", f"lorasb-test-srun-{uuid.uuid4().hex[:8]}"
    proc = sbatch("slurm/train_srun.sbatch", name, tmp_path, options=["--ntasks-per-node=2"],
                  OUTPUT_DIR=str(out), EXTRA_ARGS=" ".join(RUN[2:]))  # overrides from the environment
    # run_config.json is written after every rank joined, i.e. after every rank installed its handler.
    deadline = time.time() + TIMEOUT
    while not (out / "run_config.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            finish(proc, tmp_path, name)
            pytest.fail("the job ended (or never started training) before it could be signalled")
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", "--name", name], check=True)
    log = finish(proc, tmp_path, name)
    assert "SIGUSR1" in log and "requeueing job" in log, log[-6000:]
    assert "start 2 on" in log  # the requeued start
    assert "[slurm] launch: srun" in log
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    inits = [r for r in records if r.get("event") == "init"]
    assert len(inits) == 2 and inits[1]["estimated"] is False and inits[1]["resumed_from"]
    assert 1 <= inits[1]["start_step"] < 3
    check_run(out, log, "srun")
    assert_same_adapter(out, reference, "slurm srun (preempted, requeued, resumed)")


def task_pid(job_name: str, procid: int) -> int | None:
    """The training process of task ``procid`` of a running job (found by its environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (f"SLURM_JOB_NAME={job_name}".encode() in environ and f"SLURM_PROCID={procid}".encode() in environ
                and argv[1:2] == [b"launch/train.py"]):
            return int(pid)
    return None


def test_slurm_a_rank_killed_mid_training_ends_the_job(slurm, tmp_path):
    """Rank 1 is killed (SIGKILL, as the OOM killer does) while training: srun's --kill-on-bad-exit
    ends rank 0, which would otherwise wait in a collective for DIST_TIMEOUT_MINUTES; the job fails
    at once with the step's exit code and is not requeued."""
    out, name = tmp_path / "run", f"lorasb-test-kill-{uuid.uuid4().hex[:8]}"
    proc = sbatch("slurm/train_srun.sbatch", name, tmp_path, options=["--ntasks-per-node=2"],
                  OUTPUT_DIR=str(out), DIST_TIMEOUT_MINUTES="10",
                  EXTRA_ARGS="data.builtin_size=200 lorasb.est_samples=6 train.epochs=1000")  # ~25k steps
    metrics_file, deadline = out / "metrics.jsonl", time.time() + TIMEOUT
    while not (metrics_file.exists() and '"step"' in metrics_file.read_text()):  # training has begun
        if proc.poll() is not None or time.time() > deadline:
            subprocess.run(["scancel", "--name", name])
            pytest.fail(f"the job ended (or never trained) before rank 1 could be killed:\n"
                        f"{job_log(tmp_path, name)[-6000:]}")
        time.sleep(0.2)
    pid = task_pid(name, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    try:
        proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name])
        proc.kill()
        pytest.fail(f"the job did not end after rank 1 was killed:\n{job_log(tmp_path, name)[-6000:]}")
    ended_after = time.time() - killed
    log = job_log(tmp_path, name)
    print(f"\njob ended {ended_after:.1f}s after rank 1 was killed, sbatch --wait exit {proc.returncode}:\n"
          + "\n".join(line for line in log.splitlines() if line.startswith(("[slurm]", "srun:"))))
    assert proc.returncode != 0, log[-6000:]
    assert ended_after < 120, log[-6000:]  # the collective timeout is 10 minutes
    assert re.search(r"srun: error: .*task 1: Killed", log), log[-6000:]
    assert re.search(r"step ended with exit code [1-9]", log) and "requeueing" not in log, log[-6000:]
    assert not (out / ADAPTER).exists()
