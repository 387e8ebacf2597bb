"""Fit, time and money: which GPUs hold a training run, how long N tokens take, what it costs.

Time comes from FLOPs at a stated utilisation (MFU, model FLOPs utilisation):

- full fine-tuning: 6*N per token (2N forward, 4N backward: gradients for activations and for weights;
  Kaplan et al. 2020, sec. 2.1), plus attention 12*L*nh*d*s per token (PaLM, Chowdhery et al. 2022, app. B);
- LoRA / QLoRA: 4*N per token (forward 2N, backward only the activation gradients 2N because the base
  weights are frozen) plus 6 x the adapter parameters, plus the same attention term;
- gradient checkpointing recomputes the forward: +2*N (+ a third of the attention term);
- QLoRA dequantises every weight on every use: time x1.3 for NF4 (torchtune's Llama-3.1-8B table, 3083 vs
  2413 tok/s) and x1.5 for LLM.int8 (bitsandbytes' int8 matmul is slower still).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from tailor.plan.catalogue import Architecture, PlanError
from tailor.plan.memory import GIB, MemoryBreakdown, TrainingSetup
from tailor.plan.params import count_parameters

QUANT_SLOWDOWN = {"qlora-nf4": 1.3, "qlora-int8": 1.5}
_GPU_KEYS = {"memory_gb", "tflops_bf16", "price_per_hour", "note"}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # usable device memory; vendors' "24 GB" cards hold 24 GiB, so we read it as GiB
    tflops_bf16: float
    price_per_hour: float
    note: str = ""


@dataclass(frozen=True)
class PriceTable:
    gpus: dict[str, GPU]
    storage_per_gb_month: float
    source: str


def load_price_table(path: str | Path | None = None) -> PriceTable:
    """The packaged gpus.yaml, updated by a user file (entries merged by GPU name; unknown keys refused)."""
    text = resources.files("tailor.plan").joinpath("gpus.yaml").read_text()
    table = _parse(yaml.safe_load(text), "gpus.yaml (packaged)")
    if path is None:
        return table
    p = Path(path)
    if not p.is_file():
        raise PlanError(
            f"--prices {path}: no such file; copy the packaged table "
            f"({resources.files('tailor.plan').joinpath('gpus.yaml')}) and edit it"
        )
    try:
        user = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"--prices {path}: not valid YAML/JSON ({e})") from e
    gpus = dict(table.gpus)
    problems = []
    for name, entry in (user or {}).get("gpus", {}).items():
        if not isinstance(entry, dict):
            problems.append(f"gpus.{name}: expected a mapping with {sorted(_GPU_KEYS)}")
            continue
        unknown = set(entry) - _GPU_KEYS
        if unknown:
            problems.append(f"gpus.{name}: unknown keys {sorted(unknown)}; valid: {sorted(_GPU_KEYS)}")
            continue
        base = gpus.get(name)
        merged = {**(base.__dict__ if base else {"name": name, "note": ""}), **entry, "name": name}
        missing = {"memory_gb", "tflops_bf16", "price_per_hour"} - set(merged)
        if missing:
            problems.append(f"gpus.{name}: new GPU needs {sorted(missing)}")
            continue
        gpus[name] = GPU(**merged)
    unknown_top = set(user or {}) - {"gpus", "storage_per_gb_month"}
    if unknown_top:
        problems.append(f"unknown top-level keys {sorted(unknown_top)}; valid: gpus, storage_per_gb_month")
    if problems:
        raise PlanError(f"--prices {path}:\n  " + "\n  ".join(problems))
    storage = float((user or {}).get("storage_per_gb_month", table.storage_per_gb_month))
    return PriceTable(gpus, storage, f"{table.source} + {path}")


def _parse(raw: dict, source: str) -> PriceTable:
    gpus = {name: GPU(name=name, **entry) for name, entry in raw["gpus"].items()}
    return PriceTable(gpus, float(raw["storage_per_gb_month"]), source)


def gpus_needed(memory: MemoryBreakdown, gpu: GPU) -> int | None:
    """Smallest n GPUs of this kind that hold the run with FSDP/ZeRO-3-style sharding (weights, gradients
    and optimizer state split n ways; activations and overhead are per GPU); None if even 64 do not."""
    capacity = gpu.memory_gb * GIB
    per_gpu = memory.activations + memory.overhead
    for n in (1, 2, 4, 8, 16, 32, 64):
        if memory.model_state / n + per_gpu <= capacity:
            return n
    return None


def training_flops_per_token(arch: Architecture, setup: TrainingSetup, trainable: int) -> float:
    n = count_parameters(arch).total
    attention = 12 * arch.num_layers * arch.num_heads * arch.head_dim * setup.max_seq_len
    flops = 4 * n + 6 * trainable + attention if setup.is_lora else 6 * n + attention
    if setup.gradient_checkpointing:
        flops += 2 * n + attention / 3
    return flops


def training_hours(
    flops_per_token: float, tokens: float, gpu: GPU, n_gpus: int, mfu: float, method: str
) -> float:
    seconds = flops_per_token * tokens / (gpu.tflops_bf16 * 1e12 * mfu * n_gpus)
    return seconds * QUANT_SLOWDOWN.get(method, 1.0) / 3600


def serving_gpus(model_bytes: float, gpu: GPU, headroom: float = 1.3) -> int:
    """GPUs to serve weights of `model_bytes` with 30% headroom for KV cache and activations."""
    return max(1, math.ceil(model_bytes * headroom / (gpu.memory_gb * GIB)))
