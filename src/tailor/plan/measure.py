"""Measure the real peak memory of a training step on CPU, to hold the planner's estimate against it.

Each case runs in a fresh subprocess: import torch/transformers/peft, record the peak RSS (VmHWM from
/proc/self/status; `resource.getrusage(RUSAGE_SELF).ru_maxrss` where /proc is missing) as the
baseline, build the model from its catalogue config
(random weights: memory depends on shapes, not values), add LoRA with PEFT (a test-only dependency; the
measurement needs the reference implementation, not tailor's), run two optimizer steps (the first one
creates the AdamW state), and report peak RSS minus the baseline. The step is the one the planner
describes: a Hugging Face loop that keeps the model output (and so the logits) until after the step,
AdamW with the fused kernel (as tailor's trainer builds it), `zero_grad(set_to_none=True)` after each
step. The planner's estimate for the same setup uses device="cpu" (no CUDA overhead).

Besides RSS, `LiveBytes` counts the bytes of every tensor storage that torch creates and frees during
the step (a dispatch mode sees every op, in forward, backward and the optimizer step; a finalizer on each
storage sees it freed). That is the CPU counterpart of `torch.cuda.max_memory_allocated`: no allocator or
glibc behaviour in it, only live tensors, and it is recorded per phase (forward + backward, optimizer
step) to check the planner's phases (`memory.phase_bytes`).

The child runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every large tensor with mmap and
returns it to the OS when freed, so RSS follows live memory. With glibc's default (a threshold that grows
after each free) freed tensors stay in the heap and peak RSS overstates live memory by 25-55% for LoRA
runs; `measure(case, fixed_mmap_threshold=False)` shows that.

Run: python -m tailor.plan.measure  (prints a JSON list; takes a few minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU tensor storages created inside the mode and still alive: `now`, and `peak` since the
    last `reset_peak()`. Storages of `existing` tensors (the weights: views such as `weight.t()` share
    them) are not counted, so the numbers are what a step adds on top of the model."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._alive: set[int] = set()
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage._cdata  # one per storage, shared by its views
            if key in self._alive or key in self._existing:
                continue
            self._alive.add(key)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.now -= nbytes

CASES = [
    {"model": "SmolLM2-135M", "method": "lora", "dtype": "fp32", "batch": 2, "seq": 512, "ckpt": False},
    {"model": "SmolLM2-135M", "method": "lora", "dtype": "fp32", "batch": 2, "seq": 512, "ckpt": True},
    {"model": "SmolLM2-135M", "method": "lora", "dtype": "bf16", "batch": 2, "seq": 512, "ckpt": False},
    {"model": "SmolLM2-135M", "method": "full", "dtype": "fp32", "batch": 2, "seq": 512, "ckpt": False},
    {"model": "tiny", "method": "lora", "dtype": "fp32", "batch": 4, "seq": 256, "ckpt": False},
]

# a tiny Llama (7,096,576 parameters) for the smallest case
TINY = {
    "name": "tiny-llama",
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "tie_embeddings": False,
}


def _architecture(name: str):
    from tailor.plan.catalogue import CATALOGUE, Architecture

    return Architecture(**TINY) if name == "tiny" else CATALOGUE[name]


def _peak_rss_bytes() -> int:
    """This process's peak RSS. Linux keeps ru_maxrss across fork+exec, so a child of a big process (pytest
    after loading models) would start at its parent's peak; VmHWM in /proc belongs to this image only."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(case: dict) -> dict:
    """Runs inside the subprocess."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tailor.methods.base import enable_activation_checkpointing

    torch.manual_seed(0)
    baseline = _peak_rss_bytes()
    arch = _architecture(case["model"])
    dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    torch.set_default_dtype(dtype)  # build directly in the target dtype (no fp32 transient)
    cfg = AutoConfig.for_model(**arch.hf_config_dict(), attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    if case["method"] == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for _, p in model.named_parameters():  # adapters in fp32, as tailor keeps them
            if p.requires_grad:
                p.data = p.data.float()
    if case["ckpt"]:
        enable_activation_checkpointing(model)
        if case["method"] == "lora":
            model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, arch.vocab_size, (case["batch"], case["seq"]))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    live = {}
    with LiveBytes([*model.parameters(), *model.buffers()]) as tracker:
        for _ in range(2):  # the second step is the steady state (optimizer state exists)
            tracker.reset_peak()
            out = model(input_ids=ids, labels=ids)  # the caller holds the output, logits included
            out.loss.backward()
            live["forward and backward"] = (weights + tracker.peak) / GIB
            tracker.reset_peak()
            opt.step()
            live["optimizer step"] = (weights + tracker.peak) / GIB
            opt.zero_grad(set_to_none=True)
            del out
    peak = _peak_rss_bytes()
    return {**case, "measured_gib": (peak - baseline) / GIB, "live_tensor_gib": live}


def setup_for(case: dict):
    """The planner's TrainingSetup for a measurement case (fused AdamW, as the measured loop uses)."""
    from tailor.plan.memory import TrainingSetup

    return TrainingSetup(
        method=case["method"],
        rank=16,
        lora_alpha=32,
        batch_size=case["batch"],
        max_seq_len=case["seq"],
        gradient_checkpointing=case["ckpt"],
        precision="bf16" if case["dtype"] == "bf16" else "fp32",
        optimizer_kernel="fused",
    )


def estimate_for(case: dict) -> dict:
    """The planner's CPU estimate (GiB, per part) for a measurement case."""
    from tailor.plan.memory import estimate_memory

    return estimate_memory(_architecture(case["model"]), setup_for(case), device="cpu").gib()


def phases_for(case: dict) -> dict[str, float]:
    """The planner's phases (GiB) for a measurement case (memory.phase_bytes, device="cpu")."""
    from tailor.plan.memory import phase_bytes

    setup = setup_for(case)
    return {k: v / GIB for k, v in phase_bytes(_architecture(case["model"]), setup, device="cpu").items()}


def measure(case: dict, timeout: float = 1800, fixed_mmap_threshold: bool = True) -> dict:
    """Run one case in a fresh interpreter and return it with measured and estimated GiB."""
    code = f"import json, tailor.plan.measure as m; print(json.dumps(m._child({case!r})))"
    env = dict(os.environ)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=True, env=env
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_for(case)
    # the measurement starts after the imports: the planner's process part is not in it
    from tailor.plan.memory import CPU_PROCESS_GIB

    result["estimated_gib"] = est["total"] - CPU_PROCESS_GIB
    result["estimate_parts_gib"] = est
    measured = result["measured_gib"]
    result["error_percent"] = 100 * (result["estimated_gib"] - measured) / measured
    result["estimate_phases_gib"] = phases_for(case)
    return result


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=int(os.environ.get("TAILOR_MEASURE_WORKERS", "1"))) as pool:
        print(json.dumps(list(pool.map(measure, CASES)), indent=1))
