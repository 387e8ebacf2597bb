"""Memory of each process of a run in several processes (tailor.train.distributed): DDP replicates the
model, FSDP shards weights, gradients and optimizer state (see `per_process_memory`)."""

from __future__ import annotations

from tailor.names import STRATEGIES
from tailor.plan.catalogue import Architecture
from tailor.plan.memory import MemoryBreakdown, TrainingSetup
from tailor.plan.params import count_parameters


def per_process_memory(arch: Architecture, setup: TrainingSetup, memory: MemoryBreakdown, nproc: int,
                       strategy: str) -> dict[str, float | str]:
    """Bytes per process of a run in `nproc` processes (tailor.train.distributed).

    ddp replicates: every process holds the whole peak, plus DDP's gradient buckets (a second copy of
    every trainable gradient, torch's default). fsdp divides what it shards, weights, gradients and
    optimizer state, by `nproc`; activations and overhead stay per process; on top, the units gathered
    whole at a time: the root unit (embeddings, output head, final norm: gathered from the first forward
    to the end of backward) and two decoder layers (the one computing and the one prefetched).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    per_process = memory.activations + memory.overhead
    if strategy == "ddp":
        return {"strategy": strategy, "nproc": nproc, "sharded": 0.0, "replicated": memory.model_state,
                "gathered": memory.all_gradients, "per_process": memory.total + memory.all_gradients,
                "activations_and_overhead": per_process}
    counts = count_parameters(arch)
    weights = memory.frozen_weights + memory.adapter_weights
    root_share = (counts.embedding + counts.lm_head) / counts.total
    layer_bytes = weights * (1 - root_share) / arch.num_layers
    gathered = weights * root_share + 2 * layer_bytes
    sharded = memory.model_state / nproc
    return {"strategy": strategy, "nproc": nproc, "sharded": sharded, "replicated": 0.0, "gathered": gathered,
            "per_process": sharded + gathered + per_process, "activations_and_overhead": per_process}


__all__ = ["per_process_memory"]
