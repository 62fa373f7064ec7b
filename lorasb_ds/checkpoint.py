"""Training checkpoints: atomic, small, and exact to resume from.

A checkpoint holds what training changes and nothing the run can rebuild: the R matrices with their
fp32 masters and Adam moments (DeepSpeed's ``save_checkpoint(exclude_frozen_parameters=True)``; B, A
and W0 are frozen and never written), the learning-rate schedule, the position in the data (epoch and
next micro-batch), each rank's RNG state, and the path and id of the init file that B, A came from.

Layout, under ``<output_dir>/checkpoints/``::

    step00000040/            a complete checkpoint
        state/...            DeepSpeed's files (every rank writes its optimizer shard)
        rng_rank{k}.pt       RNG state of rank k
        COMPLETE             JSON: step, epoch, next micro-batch, init file; written last
    .tmp-step00000050/       one being written: ignored, removed by the next save

Every rank calls ``save``/``load`` (collective). A checkpoint is first written under a temporary
name, then rank 0 writes the marker and renames it into place, so a crash mid-write leaves only a
``.tmp-`` directory that resuming never looks at.

Also here: the rules of resuming (which output folder a run may use, which checkpoint ``--resume``
means, which settings must agree) and the stop on SIGTERM / SIGUSR1 that writes a checkpoint first.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig
from .files import MARKER, holds_a_run, read_marker, write_marker

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (resume with --resume auto)."""
CHECKPOINTS = "checkpoints"
TAG = "state"
_NAME = re.compile(r"^step(\d{8})$")


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    best_eval_loss: float | None = None
    """Lowest validation loss so far (early stopping)."""
    evals_since_best: int = 0
    """Validations since that best one."""
    best_step: int | None = None
    """The step of the checkpoint kept for the best validation loss (``train.keep_best``)."""


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"step{step:08d}")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (with their marker), oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _NAME.match(name)) and os.path.isfile(os.path.join(root, name, MARKER))]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """``auto``: the newest complete checkpoint of ``output_dir`` (None if there is none); else a path."""
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, MARKER)):
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no {MARKER} marker)")
    return resume


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, output_dir: str, position: Position, extra: dict, keep_last: int) -> str:
    """Write a checkpoint of ``engine`` at ``position``; keep the newest ``keep_last``, and the one of
    ``position.best_step`` (``train.keep_best``). Collective."""
    rank = dist.get_rank()
    root = os.path.join(output_dir, CHECKPOINTS)
    final = checkpoint_path(output_dir, position.step)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    if rank == 0:
        for stale in (p for p in os.listdir(root) if p.startswith(".tmp-")) if os.path.isdir(root) else ():
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(tmp, tag=TAG, exclude_frozen_parameters=True, save_latest=False)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        write_marker(tmp, dict(asdict(position), world_size=dist.get_world_size(), **extra))
        if os.path.exists(final):  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        best = None if position.best_step is None else checkpoint_path(output_dir, position.best_step)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: str) -> tuple[Position, dict]:
    """Restore R, optimizer, schedule and this rank's RNG from ``path``. Collective."""
    marker = read_marker(path)
    if marker["world_size"] != dist.get_world_size():
        raise ConfigError(f"--resume {path}: written by {marker['world_size']} ranks, this run has "
                          f"{dist.get_world_size()}; resume with the same world size")
    load_path, _ = engine.load_checkpoint(path, tag=TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ConfigError(f"--resume {path}: DeepSpeed found no checkpoint under tag '{TAG}'")
    rng = torch.load(os.path.join(path, f"rng_rank{dist.get_rank()}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    position = Position(marker["step"], marker["epoch"], marker["micro_batch"], marker.get("best_eval_loss"),
                        marker.get("evals_since_best", 0), marker.get("best_step"))
    return position, marker


# --------------------------------------------------------------------------- resume rules


def check_output_dir(cfg: RunConfig) -> None:
    """The output directory must be writable and must not hold another run (unless told). Nothing is
    created here: a refused run leaves no folder behind (rank 0 creates it once the checks pass)."""
    out = cfg.train.output_dir
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest ancestor that exists is where the folder will go
        existing = os.path.dirname(existing)
    why = None
    if not os.path.isdir(existing):
        why = f"'{existing}' is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no write permission on '{existing}'"
    if why:
        raise ConfigError(f"train.output_dir '{out}' is not writable ({why}); choose another")
    if holds_a_run(out) and not (cfg.train.resume or cfg.train.overwrite):
        raise ConfigError(f"train.output_dir '{out}' already holds a run; continue it with --resume auto, "
                          "start over with --overwrite, or choose another directory")


def resume_point(cfg: RunConfig) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its marker, checked against this run's configuration."""
    if not cfg.train.resume:
        return None, None
    path = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    if path is None:
        return None, None
    marker = read_marker(path)
    mine = run_identity(cfg)
    for section, values in marker["run"].items():
        for key, value in values.items():
            if mine[section].get(key) != value:
                raise ConfigError(
                    f"--resume {path}: the checkpoint was made with {section}.{key} = {value!r}, this run "
                    f"has {mine[section].get(key)!r}; resume with the same settings or start a new run")
    if not os.path.isfile(marker["init_file"]):
        raise ConfigError(f"--resume {path}: its init file {marker['init_file']} is missing")
    return path, marker


def run_identity(cfg: RunConfig) -> dict:
    """The settings a checkpoint must agree on with the run that resumes it."""
    d = cfg.to_dict()
    train = {k: d["train"][k] for k in ("lr", "weight_decay", "betas", "eps", "warmup_ratio", "schedule",
                                        "epochs", "max_steps", "seed")}
    train["betas"] = list(train["betas"])
    return {"model": d["model"], "lorasb": d["lorasb"], "data": d["data"], "train": train}


class PreemptionFlag:
    """SIGTERM or SIGUSR1 (sent by Slurm before a time limit or preemption) ask the run to stop.

    The handler only sets a flag; at each optimizer-step boundary every rank all-reduces it
    (``ranks.any_rank``), so all ranks agree to stop at the same step, checkpoint together and exit
    with ``EXIT_PREEMPTED``.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
