"""What the loop needs to know about other processes: joining them, wrapping the training module (DDP or
FSDP2), its share of each batch, sums across processes, and the full weights for a save.

Processes are started by torchrun (`torch.distributed.run`), which sets RANK, LOCAL_RANK, WORLD_SIZE and
the rendezvous in the environment; `tailor train --nproc N` starts torchrun for one machine
(tailor.train.launch). Single-process runs never initialise torch.distributed; every function here then
answers for a world of one without communicating.

Strategies (PyTorch's own engine, nothing home-made):
  ddp   DistributedDataParallel: every process holds the whole model; gradients of the trainable
        parameters are averaged by all-reduce after backward.
  fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter, frozen or trainable, is split
        in dim 0 across processes (DTensor shards); each decoder layer is gathered just before its forward
        and backward and freed after. The optimizer only ever sees the trainable shards, so its state is
        split too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn


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


# ------------------------------------------------------------------------------------------------------
# Joining the other processes
# ------------------------------------------------------------------------------------------------------


def launched_world_size() -> int:
    """The number of processes torchrun started for this job (1 when not started by torchrun); known
    before torch.distributed is initialised and after it is torn down."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those torchrun started (0 when not started by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def join_processes(device: str | None, timeout_seconds: float) -> str | None:
    """Initialise torch.distributed from torchrun's environment when it started several processes, and
    return the device this process trains on (cuda:LOCAL_RANK on GPUs); `device` unchanged otherwise.

    Backend: NCCL on CUDA, gloo on CPU. `timeout_seconds` bounds every collective wait (a process that
    died or hangs makes the others fail after it instead of waiting forever)."""
    if launched_world_size() <= 1 or is_distributed():
        return device
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if on_cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=local)
        return str(local)
    dist.init_process_group("gloo", timeout=timeout)
    return "cpu"


def leave_processes() -> None:
    if is_distributed():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# Wrapping the training module, and each process's share of a batch
# ------------------------------------------------------------------------------------------------------


def wrapper_for(strategy: str) -> Callable[[nn.Module], nn.Module] | None:
    """How `fit` wraps the training module (tailor.loss.CausalLMLoss) in this world; None in one process."""
    if not is_distributed():
        return None
    if strategy == "fsdp":
        return shard_fully
    if strategy == "ddp":
        return lambda module: nn.parallel.DistributedDataParallel(module)
    raise ValueError(f"unknown strategy {strategy!r}; choose ddp or fsdp")


def shard_fully(module: nn.Module) -> nn.Module:
    """FSDP2 over the training module: one unit per decoder layer, then the rest (embeddings, final
    norm, output head) in the root unit.

    FSDP2 gathers a unit's parameters as one flat buffer, so a unit must hold one dtype. LoRA with bf16
    keeps a bf16 frozen base and fp32 adapters in the same layer: there the modules that own the frozen
    weights (the layer's linears and norms) become one unit of their own inside the layer's, so each part
    is gathered in its own dtype (no rounding of the fp32 master weights, and saves gather them exactly).
    Units are gathered by their forward hooks, hence units of modules that are called (the adapters' A and
    B are used by their LoRA layer's forward as plain weights, never called).
    """
    from torch.distributed.fsdp import fully_shard

    # Every call of a layer gathers its weights (a collective). The shared-prefix path runs the layers once
    # more when a batch's rows share a prefix: a data-dependent count that would leave the processes
    # waiting at different collectives. One body call per batch keeps them in step.
    if hasattr(module, "share_prefix"):
        module.share_prefix = False
    layer_names = set(getattr(_inner_model(module), "_no_split_modules", None) or ())
    layers = [m for m in module.modules() if type(m).__name__ in layer_names]
    for unit in [*layers, module]:
        _shard_frozen_apart(unit)
        fully_shard(unit)
    return module


def _shard_frozen_apart(unit: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    taken = {id(p) for m in unit.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    free = [p for p in unit.parameters() if id(p) not in taken]
    if len({p.dtype for p in free}) <= 1:
        return
    owners = [m for m in unit.modules() if m is not unit
              and any(not p.requires_grad and id(p) not in taken for p in m.parameters(recurse=False))]
    fully_shard(owners)


def _inner_model(module: nn.Module) -> nn.Module:
    return getattr(module, "model", module)


def uses_fsdp(module: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return module is not None and isinstance(module, FSDPModule)


def share_of_batch(indices: list[int]) -> list[int]:
    """This process's share of a global batch: every world_size-th index from its rank on, so the
    processes together see each example of the batch exactly once."""
    return indices[rank()::world_size()]


# ------------------------------------------------------------------------------------------------------
# Whole weights and optimizer state for saving and loading (collectives under FSDP: every process calls)
# ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_parameters(module: nn.Module | None) -> Iterator[None]:
    """Inside, the modules under an FSDP-wrapped `module` hold whole parameters in their own dtype
    (gathered from all processes) instead of their shards, so the single-process save code writes the
    same files; the shards are put back on exit. Every process must enter it; nothing changes without
    FSDP. Memory: the whole model on every process for the time of the save.

    Why not FSDP's own unshard(): it gathers in the compute dtype of the mixed-precision policy, and its
    buffers are freed in place afterwards, which fails once a save has shared them (e.g. with numpy)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not uses_fsdp(module):
        yield
        return
    for unit in module.modules():  # the root stays gathered after a forward without backward (validation)
        if isinstance(unit, FSDPModule):
            unit.reshard()
    whole: dict[int, nn.Parameter] = {}  # by id: tied weights stay one parameter
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for owner in module.modules():
        for name, shard in list(owner.named_parameters(recurse=False)):
            if isinstance(shard, DTensor):
                if id(shard) not in whole:  # the same order on every process: the gathers pair up
                    whole[id(shard)] = nn.Parameter(shard.full_tensor(), requires_grad=shard.requires_grad)
                setattr(owner, name, whole[id(shard)])
                swapped.append((owner, name, shard))
    try:
        yield
    finally:
        for owner, name, shard in swapped:
            setattr(owner, name, shard)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: gathered from its shards under FSDP (a collective), itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_into_parameter(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full `value` into `parameter`, or into this process's shard of it under FSDP (no traffic:
    every process holds the full value and keeps its own part)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(parameter, DTensor):
            shard = distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                      parameter.placements, src_data_rank=None)
            parameter.to_local().copy_(shard.to_local())
        else:
            parameter.copy_(value)


def optimizer_state(module: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state to save: its own state_dict, or under FSDP the moments gathered whole onto
    the CPU (keyed by parameter name, so a checkpoint does not depend on the number of processes)."""
    if not uses_fsdp(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module | None, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not uses_fsdp(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


__all__ = ["copy_into_parameter", "full_parameters", "is_distributed", "is_main_process", "join_processes",
           "launched_rank", "launched_world_size", "leave_processes", "load_optimizer_state",
           "optimizer_state",
           "rank", "shard_fully", "share_of_batch", "sum_across_processes", "uses_fsdp", "whole_tensor",
           "world_size", "wrapper_for"]
