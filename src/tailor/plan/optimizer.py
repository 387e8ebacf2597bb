"""Optimizer state and step temporaries, per trainable tensor, for the optimizers the planner knows:
torch AdamW (fused, foreach, for-loop kernels), bitsandbytes 32-bit and 8-bit AdamW (paged or not), SGD.

Paged optimizers (`*-paged`) allocate the state of every tensor of >= PAGED_MIN_NUMEL elements with
cudaMallocManaged (bitsandbytes `get_paged`): unified memory the driver evicts to CPU RAM under pressure
and PyTorch's allocator never sees, so it is counted as host memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

OPTIMIZERS = ("adamw", "adamw-8bit", "adamw-paged", "adamw-8bit-paged", "sgd")
OPTIMIZER_KERNELS = ("fused", "foreach", "for-loop")
# `tailor train`'s optimizer names (tailor.config.sections.OPTIMIZERS) -> the planner's
TRAIN_OPTIMIZERS = {"adamw": "adamw", "adamw-8bit": "adamw-8bit", "paged-adamw-8bit": "adamw-8bit-paged"}
# bitsandbytes optimizers (bitsandbytes/optim/optimizer.py)
PAGED_MIN_NUMEL = 100_000  # get_state_buffer: smaller tensors get ordinary device state
EIGHT_BIT_MIN_NUMEL = 4096  # min_8bit_size: smaller tensors keep 32-bit state
EIGHT_BIT_BLOCK = 2048  # block-wise quantisation: one fp32 absmax per block


def optimizer_state_bytes(numel: int, optimizer: str, state_bytes: int) -> float:
    """Optimizer state of one tensor of `numel` elements whose parameter dtype has `state_bytes`."""
    if optimizer == "adamw":
        return 2 * state_bytes * numel  # torch.optim: exp_avg and exp_avg_sq in the parameter's dtype
    if optimizer == "adamw-paged":
        return 2 * 4 * numel  # bitsandbytes 32-bit AdamW: fp32 states
    if optimizer in ("adamw-8bit", "adamw-8bit-paged"):
        if numel < EIGHT_BIT_MIN_NUMEL:
            return 2 * 4 * numel
        return 2 * (numel + 4 * math.ceil(numel / EIGHT_BIT_BLOCK))
    return 0.0  # sgd without momentum keeps no state


def state_bytes_on_device_and_host(tensors: Iterable[tuple[int, int]], optimizer: str,
                                   state_bytes: int) -> tuple[float, float]:
    """(device bytes, host bytes) of the optimizer state of `tensors` ((elements, how many) per kind);
    paged optimizers put large tensors' state in unified memory, counted on the host."""
    device = host = 0.0
    paged = optimizer.endswith("-paged")
    for numel, count in tensors:
        nbytes = count * optimizer_state_bytes(numel, optimizer, state_bytes)
        if paged and numel >= PAGED_MIN_NUMEL:
            host += nbytes
        else:
            device += nbytes
    return device, host


def step_temporary_bytes(tensors: list[tuple[int, int]], optimizer: str, kernel: str, in_backward: bool,
                         state_bytes: int) -> float:
    """Temporaries of one optimizer step on top of weights, gradients and state (torch/optim/adam.py).
    torch AdamW: fused 0 (one in-place kernel); foreach `_foreach_sqrt(exp_avg_sqs)` makes one temporary
    per tensor, all at once; for-loop `(exp_avg_sq.sqrt() / bias_correction2_sqrt)` two of one tensor at a
    time. Stepped in backward, one tensor at a time. bitsandbytes kernels and plain SGD work in place."""
    if optimizer != "adamw" or kernel == "fused":
        return 0.0
    largest = max(numel for numel, _ in tensors) * state_bytes
    if kernel == "for-loop":
        return 2 * largest
    if in_backward:
        return largest
    return sum(numel * count for numel, count in tensors) * state_bytes


__all__ = ["EIGHT_BIT_BLOCK", "EIGHT_BIT_MIN_NUMEL", "OPTIMIZERS", "OPTIMIZER_KERNELS", "PAGED_MIN_NUMEL",
           "TRAIN_OPTIMIZERS",
           "optimizer_state_bytes", "state_bytes_on_device_and_host", "step_temporary_bytes"]
