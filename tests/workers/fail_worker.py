"""Run by tests/test_launchers.py under torchrun, the deepspeed runner and mpirun: rank 1 fails
while rank 0 waits in a barrier; the launcher must end rank 0 promptly with a non-zero exit code.

usage: <launcher> tests/workers/fail_worker.py [--local_rank=N]
"""

import torch.distributed as dist

from lorasb_ds.ranks import init_distributed

rank, world, _ = init_distributed(timeout_minutes=10)  # far longer than the test waits
print(f"fail_worker: rank {rank} of {world} up", flush=True)
if rank == 1:
    raise RuntimeError("boom on rank 1")
dist.barrier()
print(f"fail_worker: rank {rank} passed the barrier", flush=True)
