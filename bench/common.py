"""Pieces shared by the benchmarks: arguments, ranks, model and DeepSpeed config, timing, memory, tables.

Every benchmark runs the same way: ``python bench/X.py [options]``. The script (the *driver*) runs
each variant on ``--nproc`` fresh processes (``torch.multiprocessing.start_processes``) that form one
process group through the package's own ``init_distributed`` (RANK, WORLD_SIZE, MASTER_ADDR/PORT set
here; gloo on CPU, NCCL on GPUs). A fresh group per variant keeps DeepSpeed's state and each
process's memory high-water mark separate. On CPU the ranks are forked from the driver, which has
imported torch, DeepSpeed and transformers once (about 10 s saved per process); CUDA does not survive
a fork, so on GPUs they are spawned. The driver prints the table; a failing rank stops the run with
its traceback and log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package of this checkout

from lorasb_ds.ranks import free_port  # noqa: E402,F401  (benchmarks take it from here)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama-style shapes. default: 63M params (50M in the targets); wide: 2 layers of hidden 2048, 122M;
# 1b: Llama-3.2-1B-like shapes with a 32k vocabulary (1.1B), for the GPU check; smollm2: the real shapes of
# SmolLM2-135M (30 layers of hidden 576, 9 query / 3 key-value heads, 49k vocabulary, tied embeddings: 134.5M).
PRESETS = {
    "default": dict(hidden=768, layers=8, intermediate=2048, heads=12, kv_heads=4, vocab=8192),
    "wide": dict(hidden=2048, layers=2, intermediate=5504, heads=16, kv_heads=4, vocab=8192),
    "1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=32000),
    "smollm2": dict(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True),
}


def model_args(parser: argparse.ArgumentParser, seq: int, micro_batch: int) -> None:
    """Model shape, batch, device and rank options common to every benchmark."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="model shape; --hidden etc. override single fields")
    for name in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--seq", type=int, default=seq, help="tokens per sample")
    parser.add_argument("--micro_batch", type=int, default=micro_batch, help="samples per rank per step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on cpu, 1 on cuda)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole set of variants this many times, alternating, and pool the "
                             "figures (evens out a varying load on a shared machine)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the shape from the preset, dtype and rank count from the device; set the environment the
    libraries read at import (call before importing torch or DeepSpeed)."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.tied = getattr(args, "tied", None) or False
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.nproc = args.nproc or (2 if args.device == "cpu" else 1)
    os.environ["DS_ACCELERATOR"] = args.device
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"  # one core per rank, as torchrun sets for world > 1
    return args


def run_ranks(fn, args, variant: str, nproc: int) -> dict:
    """``fn(args, variant)`` on ``nproc`` fresh ranks, one process group; returns rank 0's result.

    Each rank's output goes to a log, printed only when a rank fails.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            mp.start_processes(_rank_main, args=(fn, args, variant, nproc, free_port(), tmp), nprocs=nproc,
                               start_method="fork" if args.device == "cpu" else "spawn")
        except Exception as e:
            for k in range(nproc):
                with open(os.path.join(tmp, f"rank{k}.log")) as f:
                    sys.stderr.write(f"--- rank {k} log (tail)\n{f.read()[-6000:]}\n")
            sys.exit(f"variant {variant} failed: {e}")
        print(f"  {variant}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def run_rounds(fn, args, variants: list[str], nproc_of=None) -> dict[str, list[dict]]:
    """Every variant ``args.rounds`` times, alternating (A B C A B C ...): ``{variant: [result per round]}``."""
    runs = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            runs[v].append(run_ranks(fn, args, v, nproc_of(v) if nproc_of else args.nproc))
    return runs


def _rank_main(local_rank: int, fn, args, variant: str, nproc: int, port: int, tmp: str) -> None:
    log = os.open(os.path.join(tmp, f"rank{local_rank}.log"), os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = fn(args, variant)
    if local_rank == 0:
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ worker side


def preload(peft: bool = False) -> None:
    """Import the heavy libraries once in the driver, so that every forked (CPU) rank has them."""
    import deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import lorasb_ds.estimate  # noqa: F401
    import lorasb_ds.train  # noqa: F401
    if peft:
        import peft  # noqa: F401
    try:  # deepspeed.initialize imports it on first use, and with it torch's compiler stack (~6 s)
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:
        pass


def dtype_of(args):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def start() -> tuple[int, int, "object"]:
    """Process group through the package's own start (gloo on CPU, NCCL on GPUs); seeded."""
    import deepspeed

    from lorasb_ds.ranks import init_distributed

    rank, world, device = init_distributed(timeout_minutes=30)
    deepspeed.runtime.utils.set_random_seed(1234)
    return rank, world, device


def ds_config(args) -> dict:
    """The repository's ``ds_configs/zero3.json``, read by the package, with this run's micro-batch and
    precision; TensorBoard off (a benchmark writes no run directory)."""
    from lorasb_ds.config import load_ds_config

    ds = load_ds_config(os.path.join(REPO, "ds_configs", "zero3.json"))
    ds.pop("tensorboard", None)
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = args.micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["bf16"] = {"enabled": args.dtype == "bf16"}
    return ds


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
                       tie_word_embeddings=args.tied)


def build_model(args, ds: dict):
    """The Llama built from its config, partitioned while it is built (``zero.Init`` through
    ``HfDeepSpeedConfig``, as ``modeling.load_model`` loads real models): no rank holds it whole."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers reads it through a weak reference)
    model = AutoModelForCausalLM.from_config(llama_config(args), dtype=dtype_of(args))
    del keep_alive
    return model


def random_inits(layers: dict) -> dict:
    """B, A with orthonormal columns / rows and a nonzero diagonal R, seeded per module (same on all ranks)."""
    import torch

    from lorasb_ds.files import LayerInit

    inits = {}
    for k, (name, layer) in enumerate(layers.items()):
        gen = torch.Generator().manual_seed(k)
        B = torch.linalg.qr(torch.randn(layer.out_features, layer.r, generator=gen))[0]
        A = torch.linalg.qr(torch.randn(layer.in_features, layer.r, generator=gen))[0].T
        R = torch.diag(torch.linspace(1e-2, 1e-3, layer.r))
        inits[name] = LayerInit(B.contiguous(), A.contiguous(), R, energy=0.0)
    return inits


def engine(model, params, ds: dict):
    """``deepspeed.initialize`` as ``train.build`` calls it: torch AdamW with the pipeline's default
    settings over ``params`` only."""
    import deepspeed
    import torch

    from lorasb_ds.config import TrainConfig

    t = TrainConfig()
    adamw = (lambda ps: torch.optim.AdamW(ps, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=adamw, config=ds)
    return engine


def random_batch(args, device, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def slowest(seconds: list[float], device) -> list[float]:
    """Per entry, the largest value over ranks (a step lasts as long as its slowest rank)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def per_rank(value: float, device) -> list[float]:
    """``value`` of every rank, in rank order."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x) for x in out]


def fix_mmap_threshold(nbytes: int) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)``: allocations of at least ``nbytes`` are mapped and
    unmapped on their own, so freed tensors leave the process. glibc's default threshold grows with
    the largest block freed, after which big tensors come from a heap that keeps freed memory:
    the high-water mark then depends on allocation history more than on what is held."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if nbytes > 0 and not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes):
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def peak_rss() -> int:
    """High-water mark of this process's resident memory in bytes (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_gpu(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def optimizer_state(engine, device) -> tuple[int, int]:
    """Elements and bytes of the optimizer's state over all ranks: the fp32 master partitions plus
    every non-scalar tensor of the inner optimizer's state (Adam: exp_avg, exp_avg_sq)."""
    import torch
    import torch.distributed as dist

    opt = engine.optimizer
    tensors = []
    if opt is not None and hasattr(opt, "fp32_partitioned_groups_flat"):
        tensors += list(opt.fp32_partitioned_groups_flat)
        tensors += [t for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    t = torch.tensor([sum(x.numel() for x in tensors), sum(x.numel() * x.element_size() for x in tensors)],
                     dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t[0]), int(t[1])


# ------------------------------------------------------------------------------------ driver side


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pooled(runs: list[dict], key: str) -> list:
    """``key``'s lists of every round, concatenated."""
    return [x for run in runs for x in run[key]]


def highest(runs: list[dict], key: str) -> list[float]:
    """Per rank, the highest value of ``key`` over the rounds (memory peaks)."""
    return [max(xs) for xs in zip(*(run[key] for run in runs))]


def machine_line(args) -> str:
    """CPU, cores, GPU, load average, library versions and the rank layout, for the head of a table."""
    cpu, gpu = cpu_name(), ""
    if args.device == "cuda":  # from nvidia-smi: the driver itself never touches CUDA
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], text=True,
                                   capture_output=True, timeout=30).stdout.split("\n")
            gpu = f"{names[0].strip()} x{len([n for n in names if n.strip()])}"
        except (OSError, subprocess.SubprocessError):
            gpu = "?"
    versions = []
    for pkg in ("torch", "deepspeed", "transformers", "peft"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except Exception:
            versions.append(f"{pkg} -")
    return (f"machine: {cpu}, {os.cpu_count()} cores{', GPU ' + gpu if gpu else ''}, {load_line()} | "
            f"python {platform.python_version()}, {', '.join(versions)} | {args.nproc} rank(s), {args.device}, "
            f"{args.dtype}")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def load_line() -> str:
    return "load avg " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def shape_line(args) -> str:
    return (f"model: Llama hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, heads "
            f"{args.heads}/{args.kv_heads} kv, vocab {args.vocab}; seq {args.seq} x micro-batch {args.micro_batch}"
            f" per rank; ZeRO-3 (ds_configs/zero3.json)")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def save_json(args, payload: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
