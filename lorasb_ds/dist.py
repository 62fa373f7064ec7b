"""Process-group set-up for every way a run can be started.

``torchrun`` and the ``deepspeed`` runner set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. MPI launchers (``mpirun``, ``deepspeed --launcher slurm``) do not: DeepSpeed then
discovers ranks through mpi4py. A plain ``python launch/train.py`` is a world of one, for which the
five variables are filled in here (``deepspeed.zero.Init`` reads LOCAL_RANK unconditionally).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    """World size as the launcher announced it (1 for a plain single process)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def init_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, NCCL on GPUs); returns (rank, world size, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and not any(v in os.environ for v in _MPI_VARS):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes), auto_mpi_discovery=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.current_device_name())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
