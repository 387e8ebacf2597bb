"""QLoRA step cost: a bf16 LoRA step against QLoRA-NF4 and QLoRA-int8 steps, same model, data and batches.

    python benchmarks/qlora_step.py                 # default model, 8 timed steps each, ~5 min on 2 cores
    python benchmarks/qlora_step.py --steps 20 --repeats 2 --json qlora.json

Each configuration runs tailor's own path (`get_method(name).prepare` + `tailor.train.fit`, no evaluation
or checkpoint hooks) in its own subprocess, so peak memory does not mix:

    lora        LoRA r=16 all-linear on the bf16 base (the reference)
    qlora-nf4   the same adapter on a base whose block linear layers are 4-bit NF4 + double quantization
    qlora-int8  the same on an 8-bit (LLM.int8()) base

Same recipe for all (r=16, alpha=32, dropout 0, batch 8, max_seq_len 256, AdamW lr 2e-4 constant, clip
1.0, seed 0): fit's length-grouped batch order is a function of the seed, so every configuration trains on
exactly the same batches. The first `--warmup` steps are not timed. Wall seconds per step are what a user
waits; the ratios use the median step (a step slowed by another process on a shared machine does not move
it); CPU seconds per step (process_time) are printed too. With `--repeats N` the configurations run
round-robin N times and the run with the fastest median of each is kept (noise only ever adds time).

Reported per configuration: s/step (mean and median), tokens/s, the ratio of its step time to LoRA's,
peak RSS (whole process, and the training phase alone), the frozen-weight bytes of the quantized layers
against the same layers in bf16 (tailor.quant.frozen_weight_bytes), all frozen bytes of the model,
trainable parameters, and the mean validation loss after training. Goal (issue 10): NF4 step within 1.15x
of the bf16 LoRA step, quantized-layer bytes at most 0.30x bf16's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path
from _shared import (  # noqa: E402
    TrainingPeak,
    add_recipe_args,
    config_list,
    load_data,
    peak_rss_mib,
    pick_device,
    print_machine,
    run_child,
    set_threads,
    synchronize,
    train_config,
)

CONFIGS = ("lora", "qlora-nf4", "qlora-int8")
REFERENCE = "lora"
GOAL = {"nf4_step_ratio": 1.15, "nf4_bytes_ratio": 0.30}
RESULT_MARKER = "QLORA_STEP_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, CONFIGS, steps=8, train_examples=256, eval_examples=16, timeout=1800.0)
    p.add_argument("--repeats", type=int, default=1, help="round-robin runs per configuration (fastest kept)")
    args = p.parse_args(argv)
    args.config_list = config_list(p, args, CONFIGS)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------- child
def summarise(marks: list[tuple[float, float, int]], warmup: int, device: str) -> dict[str, Any]:
    """From (wall, cpu, real tokens) at the end of each step (index 0 = before step 1): the timed window."""
    start, end = marks[warmup], marks[-1]
    steps = len(marks) - 1 - warmup
    wall, cpu = end[0] - start[0], end[1] - start[1]
    tokens = sum(m[2] for m in marks[warmup + 1:])
    on_cpu = not device.startswith("cuda")
    step_s = [round(b[0] - a[0], 4) for a, b in zip(marks[warmup:-1], marks[warmup + 1:], strict=True)]
    return {"timed_steps": steps, "tokens": tokens, "s_per_step": round(wall / steps, 4),
            "median_s_per_step": round(statistics.median(step_s), 4), "step_s": step_s,
            "tokens_per_s": round(tokens / wall, 2),
            "cpu_s_per_step": round(cpu / steps, 4) if on_cpu else None}


def run_config(args: argparse.Namespace, name: str, device: str) -> dict[str, Any]:
    import torch

    from tailor.lora import trainable_parameters
    from tailor.loss import validation_loss
    from tailor.methods import get_method
    from tailor.models import load_model
    from tailor.quant import frozen_weight_bytes
    from tailor.train import fit
    from tailor.train.hooks import Hook, MetricsHook
    from tailor.train.run import seed_everything

    run_dir = tempfile.mkdtemp(prefix=f"qlora-step-{name}-")
    config = train_config(args, name, device, run_dir)
    method = get_method(name)
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=device)
    train_set, eval_set = load_data(args, tokenizer)
    seed_everything(args.seed)  # the same adapter init for every configuration
    started = time.perf_counter()
    model = method.prepare(model, config)
    prepare_s = time.perf_counter() - started
    quantized = frozen_weight_bytes(model)
    trainable, total = trainable_parameters(model)

    marks = [(time.perf_counter(), time.process_time(), 0)]
    last = {"loss": math.nan}

    class StepClock(Hook):
        def on_step(self, run: Any, record: Any) -> None:
            synchronize(device)
            marks.append((time.perf_counter(), time.process_time(), record.tokens))
            last["loss"] = record.loss

    peak = TrainingPeak()
    peak.reset()
    fit(model, train_set, [], config, Path(run_dir), tokenizer.pad_token_id, lambda _m, _d: None,
        hooks=[MetricsHook(), StepClock()])
    result = summarise(marks, args.warmup, device)
    result.update(peak_rss_mib=peak_rss_mib(),
                  train_peak_rss_mib=peak.read_mib())
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result.update(
        prepare_s=round(prepare_s, 2), last_train_loss=round(float(last["loss"]), 5),
        val_loss=round(validation_loss(model, eval_set, args.batch_size, tokenizer.pad_token_id,
                                       config.precision), 5),
        quantized_layers=quantized.layers, quantized_bytes=quantized.quantized,
        quantized_bf16_bytes=quantized.bf16,
        quantized_bytes_ratio=round(quantized.ratio, 4) if quantized.layers else None,
        frozen_weight_bytes=method.frozen_weight_bytes(model), trainable_params=trainable, total_params=total,
    )
    return result


def child_main(args: argparse.Namespace) -> None:
    import torch

    device = pick_device(args.device)
    set_threads(args.threads)
    started = time.perf_counter()
    try:
        result = run_config(args, args.child, device)
        result["status"] = "ok"
    except ImportError as error:  # bitsandbytes (or peft) not installed
        result = {"status": "unavailable", "error": f"{type(error).__name__}: {error}"}
    result.update(config=args.child, device=device, threads=torch.get_num_threads(),
                  child_wall_s=round(time.perf_counter() - started, 1))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the least median step time (failed runs only when nothing succeeded)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: r["median_s_per_step"]))
    best["runs_median_s_per_step"] = [r["median_s_per_step"] for r in ok]
    return best


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each configuration's median step time over LoRA's (the median: a step slowed by another process on
    a shared machine does not move it), its CPU time per step over LoRA's, and the goal check for NF4."""
    reference = results.get(REFERENCE, {})
    out: dict[str, Any] = {}
    for name, r in results.items():
        if r.get("status") != "ok" or reference.get("status") != "ok":
            continue
        r["step_ratio"] = round(r["median_s_per_step"] / reference["median_s_per_step"], 4)
        if r.get("cpu_s_per_step") and reference.get("cpu_s_per_step"):
            r["cpu_step_ratio"] = round(r["cpu_s_per_step"] / reference["cpu_s_per_step"], 4)
        out[name] = {k: r.get(k) for k in ("step_ratio", "cpu_step_ratio", "quantized_bytes_ratio")}
    nf4 = results.get("qlora-nf4", {})
    if nf4.get("step_ratio") is not None:
        out["goal"] = {"nf4_step": nf4["step_ratio"] <= GOAL["nf4_step_ratio"],
                       "nf4_bytes": (nf4.get("quantized_bytes_ratio") or math.inf) <= GOAL["nf4_bytes_ratio"]}
    return out


def mib(value: float | None) -> str:
    return f"{value / 2**20:.1f}" if value else "-"


def cell(r: dict[str, Any], key: str, width: int, fmt: str) -> str:
    value = r.get(key)
    return format(value, fmt).rjust(width) if isinstance(value, (int, float)) else "-".rjust(width)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = (f"{'configuration':<12}{'s/step':>8}{'median':>8}{'cpu s/step':>11}{'tokens/s':>10}"
              f"{'x LoRA':>8}{'x cpu':>7}"
              f"{'peak RSS MiB':>13}{'train RSS':>10}{'quant MiB':>10}{'bf16 MiB':>9}{'ratio':>7}"
              f"{'frozen MiB':>11}{'val loss':>9}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{name:<12}{r.get('status', 'failed')}: {r.get('error', '')}"[:200])
            continue

        lines.append(
            f"{name:<12}{cell(r, 's_per_step', 8, '.3f')}{cell(r, 'median_s_per_step', 8, '.3f')}"
            f"{cell(r, 'cpu_s_per_step', 11, '.3f')}"
            f"{cell(r, 'tokens_per_s', 10, '.1f')}{cell(r, 'step_ratio', 8, '.3f')}"
            f"{cell(r, 'cpu_step_ratio', 7, '.3f')}"
            f"{cell(r, 'peak_rss_mib', 13, '.0f')}{cell(r, 'train_peak_rss_mib', 10, '.0f')}"
            f"{mib(r.get('quantized_bytes')):>10}{mib(r.get('quantized_bf16_bytes')):>9}"
            f"{cell(r, 'quantized_bytes_ratio', 7, '.3f')}{mib(r.get('frozen_weight_bytes')):>11}"
            f"{cell(r, 'val_loss', 9, '.4f')}")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    set_threads(args.threads)  # the children's count, so that the machine line says what they run with
    machine = print_machine(pick_device(args.device))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.config_list}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for repeat in range(args.repeats):
        for name in args.config_list:
            print(f"[{time.strftime('%H:%M:%S')}] {name} (run {repeat + 1}/{args.repeats}) ...",
                  file=sys.stderr, flush=True)
            runs[name].append(run_child(__file__, name, argv, args.timeout, RESULT_MARKER))
    results = {name: fastest(r) for name, r in runs.items()}
    summary = compare(results)
    print(format_table(results))
    for name in args.config_list:
        r = results[name]
        if r.get("step_ratio") is not None and name != REFERENCE:
            cpu = f", per CPU-second {r['cpu_step_ratio']:.3f}x" if r.get("cpu_step_ratio") else ""
            size = (f"; quantized layers {r['quantized_bytes_ratio']:.3f}x the bf16 bytes"
                    if r.get("quantized_bytes_ratio") else "")
            print(f"{name}: step {r['step_ratio']:.3f}x LoRA's{cpu}{size}")
    if summary.get("goal"):
        print("goal (NF4 step <= 1.15x LoRA, NF4 bytes <= 0.30x bf16): "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in summary["goal"].items()))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average {load_before and [round(x, 2) for x in load_before]} -> "
          f"{load_after and [round(x, 2) for x in load_after]}")
    report = {**machine, "summary": summary, "configs": results, "runs": runs,
              "settings": {k: getattr(args, k) for k in (
                  "model", "data", "steps", "warmup", "repeats", "batch_size", "max_seq_len", "rank",
                  "lora_alpha", "lr", "seed", "train_examples", "eval_examples")},
              "load_average": {"before": load_before, "after": load_after}}
    if args.json_path:
        from tailor.files import atomic_write_json

        atomic_write_json(args.json_path, report)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return None
    return parent_main(args, argv)


if __name__ == "__main__":
    main()
