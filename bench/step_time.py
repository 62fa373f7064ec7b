"""Time per training step under ZeRO-3: LoRA-SB vs PEFT LoRA vs full fine-tuning vs the frozen floor.

    python bench/step_time.py                  # 63M-param Llama, 2 CPU ranks
    python bench/step_time.py --preset wide    # 2 layers of hidden 2048
    python bench/step_time.py --device cuda --preset 1b

Variants, each in a fresh ``torchrun`` process group with the same DeepSpeed config and batch:

* ``lorasb``: ``surgery.wrap_targets`` on q,k,v,o,gate,up,down; B, A random orthonormal and R nonzero
  through ``init.apply_inits``; the optimizer holds the R matrices only. ``lorasb-fused`` (``--fused``):
  the same with q/k/v and gate/up sharing their A-projection (``lorasb.fuse_projections=true``).
* ``peft_rN``: ``peft.get_peft_model`` with ``LoraConfig(r=N)`` on the same targets.
* ``full``: every parameter trained.
* ``floor``: frozen model, forward + backward down to the embeddings with no adapter: what any
  adapter costs at least. It trains only the final norm's weight (hidden-size numbers), so that it
  runs through the same engine calls (``engine(...)``, ``engine.backward``, ``engine.step``) as the
  others: calling the module directly without an optimizer skips part of DeepSpeed's per-step
  parameter handling that no trained variant can skip.

Per variant: median seconds per step after warm-up (slowest rank per step), the ratio to LoRA-SB,
trainable parameters, the optimizer state counted from the engine over all ranks, peak memory per rank,
and the variant's FLOPs over the floor's (from the shapes) next to its measured time over the floor's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from lorasb_ds.cli import exit_process  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.model_args(p, seq=128, micro_batch=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--lorasb_rank", type=int, default=96)
    p.add_argument("--peft_ranks", default="32,96", help="comma-separated LoRA ranks")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--fused", action="store_true", help="also LoRA-SB with fused A-projections (q/k/v, gate/up)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per variant")
    return common.resolve(p.parse_args(argv))


def variants(args) -> list[str]:
    names = [f"lorasb_r{args.lorasb_rank}"] + ([f"lorasb-fused_r{args.lorasb_rank}"] if args.fused else []) \
        + [f"peft_r{r}" for r in args.peft_ranks.split(",")] + ["full", "floor"]
    if args.variants:
        wanted = args.variants.split(",")
        names = [n for n in names if n in wanted or n.split("_r")[0] in wanted]
    return names


# ------------------------------------------------------------------------------------ FLOPs


def linear_shapes(args) -> dict[str, tuple[int, int]]:
    """(in, out) of each target Linear of one decoder layer."""
    h, i, kv = args.hidden, args.intermediate, args.kv_heads * (args.hidden // args.heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def flops_per_token(args, variant: str) -> float:
    """Matmul FLOPs of one training step per token, forward + backward, from the shapes.

    floor: forward 2*in*out per Linear (targets and lm_head) plus attention (QK^T and PV over the whole
    sequence); backward 2*in*out per Linear for the input gradients (no weight gradients) and twice the
    attention's forward.
    Adapters add, per target: LoRA-SB forward 2r(in+out) + 2r^2, backward 2r(in+out) + 2r^2 (input)
    + 2r^2 (dR); PEFT LoRA forward 2r(in+out), backward 4r(in+out) (input and both weights). With an
    adapter (frozen embeddings) the inputs of layer 0's q, k, v need no gradient, so autograd skips
    their input-gradient products (base and adapter). Full fine-tuning adds 2*in*out per Linear for
    the weight gradients.
    """
    shapes = linear_shapes(args)
    weights = args.layers * sum(a * b for a, b in shapes.values()) + args.hidden * args.vocab
    attention = args.layers * 4 * args.seq * args.hidden  # QK^T and PV, forward
    floor = (2 * weights + attention) + (2 * weights + 2 * attention)  # forward + input-gradient backward
    if variant in ("floor", "full"):
        return floor + (2 * weights if variant == "full" else 0)
    kind, r = variant.split("_r")[0], int(variant.split("_r")[1])
    per_target = (lambda a, b: 4 * r * (a + b) + 6 * r * r) if kind.startswith("lorasb") else \
        (lambda a, b: 6 * r * (a + b))
    skipped = sum(2 * fan_in * (fan_out + r) for name, (fan_in, fan_out) in shapes.items()
                  if name in ("q_proj", "k_proj", "v_proj"))
    return floor + args.layers * sum(per_target(a, b) for a, b in shapes.values()) - skipped


# ------------------------------------------------------------------------------------ worker


def worker(args, variant: str) -> dict:
    from lorasb_ds.init import apply_inits
    from lorasb_ds.surgery import wrap_targets

    rank, world, device = common.start()
    ds = common.ds_config(args)
    model = common.build_model(args, ds)
    kind, r = variant.split("_r")[0], int(variant.split("_r")[1]) if "_r" in variant else 0
    layers = {}
    if kind.startswith("lorasb"):
        layers = wrap_targets(model, common.TARGETS, r, fuse=kind == "lorasb-fused")
        params = [layer.lora_R for layer in layers.values()]
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=common.TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    elif kind == "full":
        params = list(model.requires_grad_(True).parameters())
    else:  # floor: the graph starts at the embeddings so backward runs through every layer (as in estimate.py);
        # only the final norm's weight (hidden-size numbers) is trained, so the step runs through the same
        # engine calls as every other variant
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        params = [model.model.norm.weight.requires_grad_(True)]
    engine = common.engine(model, params, ds)
    if layers:
        apply_inits(layers, common.random_inits(layers))
    batch = common.random_batch(args, device, seed=rank)

    def step() -> list[float]:
        """Seconds of forward, backward and optimizer step."""
        out = {}
        forward, backward = lambda: out.update(loss=engine(**batch).loss), lambda: engine.backward(out["loss"])
        return [common.timed(fn, device) for fn in (forward, backward, engine.step)]

    engine.train()
    timed = [step() for _ in range(args.warmup + args.steps)][args.warmup:]
    per_phase = [common.slowest(list(p), device) for p in zip(*timed)]  # each phase at its slowest rank
    phases = [list(p) for p in zip(*per_phase)]  # per step: forward, backward, optimizer step
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total" if device.type == "cpu"
                                            else "self_device_time_total", row_limit=18)
    elements, nbytes = common.optimizer_state(engine, device)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    return {
        "variant": variant, "world": world, "phases": phases,
        "trainable": trainable, "opt_elements": elements, "opt_bytes": nbytes,
        "sum_r2": sum(layer.r ** 2 for layer in layers.values()),
        "peak_rss": common.per_rank(common.peak_rss(), device),
        "peak_gpu": common.per_rank(common.peak_gpu(device), device), "profile": profile,
    }


# ------------------------------------------------------------------------------------ driver


def merge(runs: list[dict]) -> dict:
    """One variant's rounds: step times pooled, medians over all of them, memory peaks the highest."""
    phases = common.pooled(runs, "phases")  # [forward, backward, step] seconds per timed step
    return dict(runs[0], phases=phases, median_s=common.median([sum(p) for p in phases]),
                phases_s=[common.median(list(p)) for p in zip(*phases)],
                peak_rss=common.highest(runs, "peak_rss"), peak_gpu=common.highest(runs, "peak_gpu"))


def report(args, results: dict[str, dict]) -> dict:
    names = list(results)
    ref = next((n for n in names if n.startswith("lorasb")), names[0])
    floor = results.get("floor")
    tokens = args.micro_batch * args.seq * args.nproc
    header = ["variant", "median step s", "x LoRA-SB", "tokens/s", "trainable params", "optimizer state elements",
              "optimizer state MiB", "peak RSS/rank MiB", "FLOPs over floor", "time over floor", "time/FLOP overhead"]
    cuda = args.device == "cuda"
    if cuda:
        header.insert(8, "peak GPU/rank MiB")
    rows, summary = [], {}
    f_floor = flops_per_token(args, "floor")
    for n in names:
        res = results[n]
        flop_over = flops_per_token(args, n) / f_floor - 1
        time_over = res["median_s"] / floor["median_s"] - 1 if floor else float("nan")
        ratio = time_over / flop_over if flop_over > 0 else float("nan")
        res.update(flop_over=flop_over, time_over=time_over, tokens_per_s=tokens / res["median_s"],
                   x_lorasb=res["median_s"] / results[ref]["median_s"])
        row = [n, f"{res['median_s']:.3f}", f"{res['x_lorasb']:.2f}", f"{res['tokens_per_s']:,.0f}",
               f"{res['trainable']:,}", f"{res['opt_elements']:,}", common.mib(res["opt_bytes"]),
               " / ".join(common.mib(x) for x in res["peak_rss"]),
               f"{100 * flop_over:+.1f}%", f"{100 * time_over:+.1f}%" if floor else "-",
               f"{ratio:.2f}" if floor and n != "floor" else "-"]
        if cuda:
            row.insert(8, " / ".join(common.mib(x) for x in res["peak_gpu"]))
        rows.append(row)
    print(common.table(header, rows))
    print("\nmedian seconds per phase (slowest rank): forward / backward / optimizer step: "
          + "; ".join(f"{n} {' / '.join(f'{x:.3f}' for x in results[n]['phases_s'])}" for n in names))
    lorasb = results.get(ref) if ref.startswith("lorasb") else None
    if lorasb:
        expected = 3 * lorasb["sum_r2"]
        print(f"\nLoRA-SB optimizer state: {lorasb['opt_elements']:,} elements, 3 x sum(r^2) = {expected:,} "
              f"({'exact' if lorasb['opt_elements'] == expected else 'MISMATCH'})")
        checks = []
        peft_hi = results.get(f"peft_r{args.lorasb_rank}")
        if peft_hi:
            checks.append(("(a) LoRA-SB / PEFT LoRA same rank", lorasb["median_s"] / peft_hi["median_s"], 0.85))
        if floor:
            checks.append(("(b) LoRA-SB time over floor / FLOP overhead",
                           lorasb["time_over"] / lorasb["flop_over"], 1.1))
            fwd_bwd = sum(lorasb["phases_s"][:2]) / sum(floor["phases_s"][:2]) - 1
            checks.append(("(b') the same for forward + backward alone (no optimizer step)",
                           fwd_bwd / lorasb["flop_over"], 1.1))
        peft_lo = results.get("peft_r32")
        if peft_lo:
            checks.append(("(c) LoRA-SB / PEFT LoRA r=32 (the target is for --preset wide)",
                           lorasb["median_s"] / peft_lo["median_s"], 1.0))
        for label, value, target in checks:
            print(f"{label}: {value:.2f} (target <= {target}{'' if value <= target else ', not reached'})")
            summary[label] = value
    for n in names:
        if results[n].get("profile"):
            print(f"\nprofile of one step, {n}, rank 0:\n{results[n]['profile']}")
    return summary


def main() -> None:
    args = parse_args()
    common.preload(peft=True)
    machine = common.machine_line(args)
    print(machine)
    print(common.shape_line(args) + f"; {args.warmup} warm-up + {args.steps} timed steps"
          + (f", {args.rounds} rounds" if args.rounds > 1 else "") + "\n", flush=True)
    results = {v: merge(runs) for v, runs in common.run_rounds(worker, args, variants(args)).items()}
    summary = report(args, results)
    print(f"\nat the end: {common.load_line()}")
    common.save_json(args, {"machine": machine, "args": vars(args), "results": results, "targets": summary})


if __name__ == "__main__":
    main()
    exit_process(0)  # as launch/train.py ends: see lorasb_ds.cli.exit_process
