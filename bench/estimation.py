"""Cost of LoRA-SB's initialization under ZeRO-3: the gradient-estimation pass and the SVD phase.

    python bench/estimation.py                 # 63M-param Llama, 50 samples in micro-batches of 3, 2 CPU ranks
    python bench/estimation.py --device cuda --preset 1b

Variants, each in a fresh process group (so each memory high-water mark is its own):

* ``train``: LoRA-SB training steps at the estimation micro-batch: the time and memory baseline.
* ``owner``: ``estimate.estimate_gradients`` as the pipeline runs it (gradient taps, the local
  gradients of each owner's modules reduced to it in buckets of ``--bucket_mb``), then
  ``init.init_from_gradient`` for the owned modules (the SVD phase) and ``init.broadcast_inits``.
* ``owner_per_module``: the same with every module reduced on its own (``lorasb.est_bucket_mb=0``).
* ``allreduce``: the same taps and batches, but every rank accumulates every module's fp32 gradient
  and all-reduces it, module by module: the approach of the reference code (and of LoRA-GA, PEFT),
  for comparison.
* ``owner_w1``: ``owner`` on a single rank, which then owns every module (the SVD phase unsharded).

Then the SVD alone, in this process, on sign(random) matrices (the flat spectrum of a sign update, the
hard case) at the preset's distinct target shapes and at ``--svd_wide`` (4096 x 4096): the captured
top-r energy of each ``lorasb.svd`` method over the exact SVD's, its iterations and its time.

Estimation runs once and cold, as in a real run; training steps are timed after a warm-up step, and
training runs at least as many passes as the estimation has micro-batches per rank: the resident memory
of both grows over their first passes (by about 0.4 GB over 8 passes at SmolLM2's shapes, training
alone), so the two peaks are compared after equal numbers of passes.
Every rank fixes glibc's mmap threshold (``--mmap_threshold``, 64 KiB), so that memory high-water marks
count tensors rather than heap that glibc keeps after freeing them. At SmolLM2's shapes 1 MiB was not
enough (many activations are below it): the resident peaks then drifted up over the passes by a few
hundred MiB and apart between ranks; at 64 KiB they are 0.75 GB lower and agree between ranks within
2 MiB, for about 5% more time per step (every allocation of 64 KiB or more is its own mapping).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from lorasb_ds.cli import exit_process  # noqa: E402
from lorasb_ds.config import LoraSBConfig  # noqa: E402
from lorasb_ds.estimate import bucket_bytes  # noqa: E402

VARIANTS = ["train", "owner", "owner_per_module", "allreduce", "owner_w1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.model_args(p, seq=128, micro_batch=3)
    p.add_argument("--samples", type=int, default=50, help="estimation samples over all ranks (reference: 50)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--lorasb_rank", type=int, default=96)
    p.add_argument("--bucket_mb", type=float, default=LoraSBConfig.est_bucket_mb,
                   help="lorasb.est_bucket_mb of the owner variants (default %(default)g)")
    p.add_argument("--svd_wide", type=int, default=4096, help="side of the square matrix of the SVD table "
                   "beside the preset's shapes (0: none)")
    p.add_argument("--mmap_threshold", type=int, default=1 << 16,
                   help="glibc mmap threshold of every rank in bytes (0: glibc's dynamic default); see "
                        "common.fix_mmap_threshold")
    return common.resolve(p.parse_args(argv))


def all_reduce_everywhere(layers, rank, device):
    """An ``OwnerReducer`` in which every rank owns every module and each module's gradient is
    all-reduced on its own."""
    import torch.distributed as dist

    from lorasb_ds.estimate import OwnerReducer

    class AllReduceEverywhere(OwnerReducer):
        def reduce(self, flat, owner):
            return dist.all_reduce(flat, async_op=True)

    return AllReduceEverywhere(layers, {name: rank for name in layers}, rank, device, bucket_bytes=0)


def worker(args, variant: str) -> dict:
    import torch

    from lorasb_ds.config import LoraSBConfig
    from lorasb_ds.estimate import OwnerReducer, assign_owners, estimate_gradients, weighted_estimation_batches
    from lorasb_ds.init import apply_inits, broadcast_inits, init_from_gradient
    from lorasb_ds.surgery import wrap_targets

    common.fix_mmap_threshold(args.mmap_threshold)
    rank, world, device = common.start()
    ds = common.ds_config(args)
    model = common.build_model(args, ds)
    layers = wrap_targets(model, common.TARGETS, args.lorasb_rank)
    engine = common.engine(model, [layer.lora_R for layer in layers.values()], ds)
    result = {"variant": variant, "world": world}
    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                torch.randint(0, args.vocab, (args.samples, args.seq), generator=gen).tolist()]
    batches = weighted_estimation_batches(examples, args.samples, args.micro_batch, rank, world, 0, 0)

    if variant == "train":
        apply_inits(layers, common.random_inits(layers))
        batch = common.random_batch(args, device, seed=rank)

        def step():
            engine.backward(engine(**batch).loss)
            engine.step()

        # at least as many passes as the estimation's micro-batches: the resident memory of either grows
        # over its first passes, so the two peaks are compared after the same number of passes
        untimed = max(args.warmup, len(batches) - args.steps)
        seconds = [common.timed(step, device) for _ in range(untimed + args.steps)]
        result["steps"] = common.slowest(seconds, device)[untimed:]
        result["passes"] = untimed + args.steps
    else:
        owners = assign_owners({n: (l.out_features, l.in_features) for n, l in layers.items()}, world)
        reducer = (all_reduce_everywhere(layers, rank, device) if variant == "allreduce" else
                   OwnerReducer(layers, owners, rank, device, 0 if variant == "owner_per_module" else
                                bucket_bytes(args.bucket_mb)))
        grads, stats = estimate_gradients(engine.module, layers, batches, owners, device, reducer=reducer)
        result["reductions"] = reducer.reductions
        held = sum(G.numel() * G.element_size() for G in grads.values())
        result.update(micro_batches=stats.micro_batches_per_rank,
                      estimation_s=max(common.slowest([stats.seconds], device)),
                      accumulators=common.per_rank(held, device), modules=common.per_rank(len(grads), device))
        result["peak_rss_estimation"] = common.per_rank(common.peak_rss(), device)
        result["peak_gpu_estimation"] = common.per_rank(common.peak_gpu(device), device)
        if variant in ("owner", "owner_w1"):
            cfg = LoraSBConfig(r=args.lorasb_rank)
            index = {name: i for i, name in enumerate(layers)}
            t0, c0 = time.perf_counter(), time.process_time()
            local = {n: init_from_gradient(G, cfg, 1e-4, index[n]) for n, G in grads.items()}
            common.sync(device)
            result["svd_s"] = common.per_rank(time.perf_counter() - t0, device)
            result["svd_cpu_s"] = common.per_rank(time.process_time() - c0, device)
            del grads
            result["broadcast_s"] = max(common.slowest([common.timed(
                lambda: broadcast_inits(layers, local, owners, device), device)], device))
    result["peak_rss"] = common.per_rank(common.peak_rss(), device)
    result["peak_gpu"] = common.per_rank(common.peak_gpu(device), device)
    return result


def target_shapes(args) -> list[tuple[int, int]]:
    """Distinct (out, in) of the seven Llama projections of the preset."""
    kv = args.kv_heads * (args.hidden // args.heads)
    shapes = [(args.hidden, args.hidden), (kv, args.hidden), (args.intermediate, args.hidden),
              (args.hidden, args.intermediate)]
    return sorted(set(shapes))


def svd_quality(args) -> list[dict]:
    """Each SVD method on sign(randn) at each shape: captured top-r energy / exact, iterations, seconds."""
    import torch

    from lorasb_ds.config import LoraSBConfig
    from lorasb_ds.init import truncated_svd

    shapes = target_shapes(args) + ([(args.svd_wide, args.svd_wide)] if args.svd_wide else [])
    rows = []
    for out, inn in shapes:
        r = min(args.lorasb_rank, out, inn)
        M = torch.sign(torch.randn(out, inn, generator=torch.Generator().manual_seed(0))).to(args.device)
        row = {"shape": [out, inn], "r": r}
        for method in ("exact", "randomized", "converged"):
            cfg = LoraSBConfig(r=r, svd=method)
            t0 = time.perf_counter()
            res = truncated_svd(M, r, cfg, seed=0)
            common.sync(torch.device(args.device))
            row[method] = {"seconds": time.perf_counter() - t0, "iterations": res.iterations,
                           "energy": float((res.U.T @ M @ res.V).square().sum())}
        for method in ("randomized", "converged"):
            row[method]["ratio"] = row[method]["energy"] / row["exact"]["energy"]
        rows.append(row)
    return rows


def svd_report(rows: list[dict]) -> dict:
    table = []
    for row in rows:
        exact = row["exact"]["seconds"]
        cells = [f"{row['shape'][0]} x {row['shape'][1]}", row["r"], f"{exact:.2f}"]
        for method in ("randomized", "converged"):
            m = row[method]
            cells += [f"{m['ratio']:.4f}", m["iterations"], f"{m['seconds']:.2f}", f"{m['seconds'] / exact:.2f}"]
        table.append(cells)
    print(common.table(["shape", "r", "exact s", "randomized: energy / exact", "iterations", "s", "x exact",
                        "converged: energy / exact", "iterations", "s", "x exact"], table))
    worst = min(row["converged"]["ratio"] for row in rows)
    print(f"\nconverged SVD, worst captured energy / exact: {worst:.4f} (target >= 0.995)")
    return {"converged SVD, worst energy / exact": worst,
            "randomized SVD, worst energy / exact": min(row["randomized"]["ratio"] for row in rows)}


def merge(runs: list[dict]) -> dict:
    """One variant's rounds: medians of the times, the highest memory peaks."""
    out = dict(runs[0])
    for key in ("peak_rss", "peak_gpu", "peak_rss_estimation", "peak_gpu_estimation"):
        if key in out:
            out[key] = common.highest(runs, key)
    if "steps" in out:
        out["step_s"] = common.median(common.pooled(runs, "steps"))
    for key in ("estimation_s", "broadcast_s"):
        if key in out:
            out[key] = common.median([run[key] for run in runs])
    for key in ("svd_s", "svd_cpu_s"):
        if key in out:
            out[key] = [common.median(list(xs)) for xs in zip(*(run[key] for run in runs))]
    return out


def variants(args) -> list[str]:
    if args.nproc > 1:
        return VARIANTS
    return ["train", "owner", "allreduce"]  # on one rank, owner is already unsharded and reduces nothing


def report(args, res: dict[str, dict]) -> dict:
    train, owner, allred, w1 = res["train"], res["owner"], res["allreduce"], res.get("owner_w1")
    per_module = res.get("owner_per_module")
    bucketed = f"owner-sharded, {args.bucket_mb:g} MB buckets"
    estimations = [(bucketed, owner)] + ([("owner-sharded, each module alone", per_module)] if per_module else [])
    estimations += [("all-reduce everywhere", allred)]
    estimations += [("owner-sharded", w1)] if w1 else []
    step, n = train["step_s"], owner["micro_batches"]
    tokens = args.micro_batch * args.seq
    rows = [["training step (LoRA-SB)", train["world"], f"{step:.3f}", f"{step:.3f}", "1.00",
             f"{tokens * train['world'] / step:,.0f}", "-"]]
    for label, r in estimations:
        per = r["estimation_s"] / r["micro_batches"]
        rows.append([f"estimation, {label} ({r['micro_batches']} micro-batches/rank)", r["world"],
                     f"{r['estimation_s']:.2f}", f"{per:.3f}", f"{per / step:.2f}",
                     f"{tokens * r['world'] / per:,.0f}", f"{r['reductions'] / r['micro_batches']:.1f}"])
    for r in filter(None, (w1, owner)):
        modules = " / ".join(str(int(m)) for m in r["modules"])
        cpu = " / ".join(f"{x:.2f}" for x in r["svd_cpu_s"])
        rows.append([f"SVD phase (modules per rank: {modules}; CPU s per rank: {cpu})", r["world"],
                     f"{max(r['svd_s']):.2f}", "-", "-", "-", "-"])
    rows.append(["broadcast of B, A, R", owner["world"], f"{owner['broadcast_s']:.2f}", "-", "-", "-", "-"])
    print(common.table(["phase", "ranks", "seconds", "per micro-batch s", "x training step", "tokens/s",
                        "reductions per micro-batch"], rows))
    print()

    cuda = args.device == "cuda"
    rows = []
    for label, r in [(f"training (LoRA-SB), {train['passes']} steps", train)] + \
            [(f"estimation, {label}", r) for label, r in estimations]:
        row = [label, r["world"], " / ".join(common.mib(x) for x in r.get("peak_rss_estimation", r["peak_rss"])),
               " / ".join(common.mib(x) for x in r.get("accumulators", [0] * r["world"]))]
        rows.append(row + ([" / ".join(common.mib(x) for x in r.get("peak_gpu_estimation", r["peak_gpu"]))]
                           if cuda else []))
    print(common.table(["variant", "ranks", "peak RSS/rank MiB", "fp32 accumulators/rank MiB"]
                       + (["peak GPU/rank MiB"] if cuda else []), rows))

    est_ratio = owner["estimation_s"] / n / step
    svd_share = max(owner["svd_s"]) / owner["estimation_s"]
    headroom = max(o - (t + a) for o, t, a in
                   zip(owner["peak_rss_estimation"], train["peak_rss"], owner["accumulators"]))
    above = max(allred["peak_rss_estimation"]) - max(owner["peak_rss_estimation"])
    summary = {"estimation per micro-batch / training step": est_ratio, "SVD phase / estimation": svd_share,
               "estimation peak - (training peak + accumulators), MiB": headroom / 2**20,
               "all-reduce-everywhere peak - owner-sharded peak, MiB": above / 2**20}
    print(f"\nestimation per micro-batch / training step: {est_ratio:.2f} (target <= 1.3)")
    print(f"SVD phase / estimation: {100 * svd_share:.1f}% (target <= 10%)", end="")
    if w1:
        key = f"SVD phase, {owner['world']} ranks / 1 rank"
        summary[key] = max(owner["svd_s"]) / max(w1["svd_s"])
        summary[key + ", CPU time"] = max(owner["svd_cpu_s"]) / max(w1["svd_cpu_s"])
        print(f"; {owner['world']} ranks / 1 rank: {summary[key]:.2f} (CPU time of the busiest rank: "
              f"{summary[key + ', CPU time']:.2f}; owner sharding: about 1/{owner['world']})", end="")
    print(f"\nestimation peak - (training peak + own accumulators): {headroom / 2**20:+,.1f} MiB (target <= one "
          f"bucket, {bucket_bytes(args.bucket_mb) / 2**20:,.1f} MiB)")
    if cuda:
        gpu = max(o - (t + a) for o, t, a in
                  zip(owner["peak_gpu_estimation"], train["peak_gpu"], owner["accumulators"]))
        summary["GPU: estimation peak - (training peak + accumulators), MiB"] = gpu / 2**20
        print(f"GPU: estimation peak - (training peak + own accumulators): {gpu / 2**20:+,.1f} MiB (target <= 0)")
    versus = owner["estimation_s"] / allred["estimation_s"]
    summary["owner-sharded / all-reduce everywhere, time per micro-batch"] = versus
    print(f"owner-sharded ({args.bucket_mb:g} MB buckets) / all-reduce everywhere, time per micro-batch: "
          f"{versus:.2f} (target <= 1.0)")
    if per_module:
        summary["buckets / each module alone, time per micro-batch"] = owner["estimation_s"] / per_module["estimation_s"]
        print(f"owner-sharded, buckets / each module alone, time per micro-batch: "
              f"{summary['buckets / each module alone, time per micro-batch']:.2f}; reductions "
              f"{owner['reductions']} vs {per_module['reductions']}")
    print(f"all-reduce everywhere: peak {above / 2**20:+,.1f} MiB per rank over owner-sharded, holding "
          f"{common.mib(max(allred['accumulators']))} vs {common.mib(max(owner['accumulators']))} MiB of accumulators")
    return summary


def main() -> None:
    args = parse_args()
    common.preload()
    machine = common.machine_line(args)
    print(machine)
    print(common.shape_line(args) + f"; LoRA-SB r={args.lorasb_rank}; {args.samples} estimation samples"
          + (f"; {args.rounds} rounds" if args.rounds > 1 else "") + "\n", flush=True)
    runs = common.run_rounds(worker, args, variants(args), lambda v: 1 if v == "owner_w1" else args.nproc)
    results = {v: merge(r) for v, r in runs.items()}
    summary = report(args, results)
    print("\nSVD of sign(randn) at the preset's shapes and a wide one (this process):\n", flush=True)
    svd_rows = svd_quality(args)
    summary |= svd_report(svd_rows)
    print(f"\nat the end: {common.load_line()}")
    common.save_json(args, {"machine": machine, "args": vars(args), "results": results, "svd": svd_rows,
                            "targets": summary})


if __name__ == "__main__":
    main()
    exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
