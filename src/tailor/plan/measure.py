"""Measure the real peak memory of a training step on CPU, to hold the planner's estimate against it.

Each case runs in a fresh subprocess: import torch/transformers/peft, record the peak RSS (VmHWM from
/proc/self/status; `resource.getrusage(RUSAGE_SELF).ru_maxrss` where /proc is missing) as the
baseline, build the model from its catalogue config
(random weights: memory depends on shapes, not values), add LoRA with PEFT (a test-only dependency; the
measurement needs the reference implementation, not tailor's), run two optimizer steps (the first one
creates the AdamW state), and report peak RSS minus the baseline. The planner's estimate for the same
setup uses device="cpu" (no CUDA overhead).

The child runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every large tensor with mmap and
returns it to the OS when freed, so RSS follows live memory. With glibc's default (a threshold that grows
after each free) freed tensors stay in the heap and peak RSS overstates live memory by 30-70% for LoRA
runs; `measure(case, fixed_mmap_threshold=False)` shows that.

Run: python -m tailor.plan.measure  (prints a JSON list; takes a few minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GIB = 1024**3

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
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if case["method"] == "lora":
            model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, arch.vocab_size, (case["batch"], case["seq"]))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak_rss_bytes()
    return {**case, "measured_gib": (peak - baseline) / GIB}


def estimate_for(case: dict) -> dict:
    """The planner's CPU estimate (GiB, per part) for a measurement case."""
    from tailor.plan.memory import TrainingSetup, estimate_memory

    precision = "bf16" if case["dtype"] == "bf16" else "fp32"
    setup = TrainingSetup(
        method=case["method"],
        rank=16,
        alpha=32,
        batch_size=case["batch"],
        seq_len=case["seq"],
        gradient_checkpointing=case["ckpt"],
        precision=precision,
    )
    return estimate_memory(_architecture(case["model"]), setup, device="cpu").gib()


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
    result["estimated_gib"] = est["total"]
    result["estimate_parts_gib"] = est
    result["error_percent"] = 100 * (est["total"] - result["measured_gib"]) / result["measured_gib"]
    return result


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=int(os.environ.get("TAILOR_MEASURE_WORKERS", "1"))) as pool:
        print(json.dumps(list(pool.map(measure, CASES)), indent=1))
