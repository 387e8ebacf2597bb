"""What the loop needs to know about other processes: its rank, the world size, and sums across them.

Single-process runs never initialise torch.distributed; every function here then answers for a world of
one without communicating.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only this process writes files (metrics, checkpoints, deliverables) and prints progress."""
    return rank() == 0


def sum_across_processes(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over all processes (a copy; `value` itself when there is one process)."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
