"""The benchmarks run end to end on a tiny model (2 CPU ranks) and print their tables; exact figures
(optimizer state, accumulator sizes, module counts) are checked, timings never are."""

import json
import sys

import pytest

from conftest import run_command

pytestmark = pytest.mark.slow

TINY = ["--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4", "--kv_heads", "2",
        "--vocab", "128", "--seq", "16", "--micro_batch", "2"]
R = 8
# (in, out) of the 7 targets of one layer: q, k, v, o (k/v are 2 heads of 16), gate, up, down
SHAPES = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
TARGET_WEIGHTS = 2 * sum(i * o for i, o in SHAPES)


def bench(script, tmp_path, *args):
    out = tmp_path / "figures.json"
    proc = run_command([sys.executable, f"bench/{script}", *TINY, *args, "--json", str(out)], timeout=300)
    assert proc.stdout.startswith("machine: ") and "torch 2." in proc.stdout and "deepspeed" in proc.stdout
    return proc.stdout, json.loads(out.read_text())


def table_rows(stdout):
    return [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]


def test_step_time_prints_every_variant_and_exact_optimizer_state(tmp_path):
    stdout, figures = bench("step_time.py", tmp_path, "--steps", "2", "--warmup", "1", "--lorasb_rank", str(R),
                            "--peft_ranks", "4,8")
    assert table_rows(stdout) == ["variant", "lorasb_r8", "peft_r4", "peft_r8", "full", "floor"]
    res = figures["results"]
    sum_r2 = 2 * len(SHAPES) * R * R
    lorasb = res["lorasb_r8"]
    assert lorasb["sum_r2"] == sum_r2 and lorasb["trainable"] == sum_r2
    assert lorasb["opt_elements"] == 3 * sum_r2  # fp32 master + exp_avg + exp_avg_sq of the R matrices only
    assert lorasb["opt_bytes"] == 4 * 3 * sum_r2
    assert "exact" in stdout and "MISMATCH" not in stdout
    for r in (4, 8):
        assert res[f"peft_r{r}"]["trainable"] == 2 * sum(r * (i + o) for i, o in SHAPES)
        assert res[f"peft_r{r}"]["opt_elements"] == 3 * res[f"peft_r{r}"]["trainable"]
    assert res["full"]["trainable"] == TARGET_WEIGHTS + 2 * 128 * 64 + 5 * 64  # + embeddings, lm_head, norms
    assert res["floor"]["trainable"] == 64 and res["floor"]["opt_elements"] == 3 * 64  # the final norm only
    for v in res.values():
        assert len(v["peak_rss"]) == 2 and all(x > 0 for x in v["peak_rss"]) and v["median_s"] > 0
    assert "(a) LoRA-SB / PEFT LoRA same rank" in stdout and "(b) LoRA-SB time over floor" in stdout


def test_estimation_prints_its_tables_and_shards_the_accumulators(tmp_path):
    stdout, figures = bench("estimation.py", tmp_path, "--samples", "7", "--steps", "1", "--warmup", "0",
                            "--lorasb_rank", str(R), "--svd_wide", "256")
    rows = table_rows(stdout)
    assert rows[0] == "phase" and rows[1] == "training step (LoRA-SB)"
    estimations = ["estimation, owner-sharded, 16 MB buckets", "estimation, owner-sharded, each module alone",
                   "estimation, all-reduce everywhere", "estimation, owner-sharded"]
    assert [r.split(" (")[0] for r in rows[2:6]] == estimations
    assert [r.split(";")[0] for r in rows[6:9]] == ["SVD phase (modules per rank: 14", "SVD phase (modules per "
                                                    "rank: 7 / 7", "broadcast of B, A, R"]
    # training's peak after as many passes as the estimation has micro-batches (2): one untimed step first
    assert rows[9:15] == ["variant", "training (LoRA-SB), 2 steps"] + estimations
    assert rows[15:] == ["shape", "32 x 64", "64 x 64", "64 x 128", "128 x 64", "256 x 256"]
    svd = {tuple(row["shape"]): row for row in figures["svd"]}
    assert all(row["converged"]["ratio"] >= 0.995 for row in svd.values())
    assert svd[(64, 64)]["converged"]["iterations"] == 0  # narrow: exact
    assert svd[(256, 256)]["converged"]["iterations"] > 1  # wide: the Krylov space grew
    res = figures["results"]
    owner, allreduce, single = res["owner"], res["allreduce"], res["owner_w1"]
    assert owner["micro_batches"] == allreduce["micro_batches"] == 2  # ceil(ceil(7 / 2) / 2)
    assert single["micro_batches"] == 4
    assert sum(owner["accumulators"]) == 4 * TARGET_WEIGHTS  # each module's fp32 G on its owner only
    assert allreduce["accumulators"] == [4 * TARGET_WEIGHTS] * 2  # every G on every rank
    assert single["accumulators"] == [4 * TARGET_WEIGHTS]
    assert sorted(owner["modules"]) == [7, 7] and single["modules"] == [14]
    # 14 modules: one reduce each when alone; in buckets, one per owner per micro-batch (all fit one bucket)
    assert res["owner_per_module"]["reductions"] == 2 * 14 and owner["reductions"] == 2 * 2
    assert allreduce["reductions"] == 2 * 14
    assert "owner-sharded (16 MB buckets) / all-reduce everywhere, time per micro-batch: " in stdout
    assert "estimation per micro-batch / training step" in stdout and "SVD phase / estimation" in stdout
