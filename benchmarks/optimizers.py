"""Optimizer memory and step time: torch AdamW against bitsandbytes' 8-bit AdamW (paged or not), same model,
data, adapter and batches.

    python benchmarks/optimizers.py                       # default model, 8 timed steps each
    python benchmarks/optimizers.py --configs adamw,adamw-8bit --steps 20 --json optimizers.json

Each configuration runs tailor's own path (`get_method("lora").prepare` + `tailor.train.fit` with
`optimizer: NAME`, no evaluation or checkpoint hooks) in its own subprocess, so peak memory does not mix:

    adamw              torch AdamW (fused where torch has the kernel): two fp32 moments per adapter weight
    adamw-8bit         bitsandbytes AdamW8bit: moments in 8 bits, block-wise (2048) with an fp32 absmax
    paged-adamw-8bit   the same in CUDA unified memory (bitsandbytes runs it as adamw-8bit on a CPU)

Same recipe for all (LoRA r=16, alpha=32, all-linear, dropout 0, batch 8, max_seq_len 256, lr 2e-4
constant, clip 1.0, seed 0): the same batches in the same order. The first `--warmup` steps are not timed;
ratios use the median step. Reported per configuration: s/step (mean, median), CPU s/step, tokens/s, the
step time over adamw's, the optimizer state measured after the first step (bytes of its state tensors,
each once: tailor.train.optimizers.optimizer_state_nbytes) beside `tailor plan`'s figure for the same run,
peak RSS (whole process, and the training phase alone; CUDA: the allocator's peak), and the validation loss
after training (8-bit moments should train as adamw does).
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
import warnings
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

CONFIGS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
REFERENCE = "adamw"
RESULT_MARKER = "OPTIMIZERS_RESULT "


def default_configs(device: str) -> tuple[str, ...]:
    """Paged state only means something on CUDA: on a CPU it is adamw-8bit again (named, it still runs)."""
    return CONFIGS if device.startswith("cuda") else CONFIGS[:2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, CONFIGS, steps=8, train_examples=256, eval_examples=16, timeout=1800.0,
                    configs_help="default: the first two on a CPU")
    args = p.parse_args(argv)
    if "--configs" not in argv:
        args.configs = ",".join(default_configs(pick_device(args.device)))
    args.config_list = config_list(p, args, CONFIGS)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------- child
def summarise(marks: list[tuple[float, float, int]], warmup: int, device: str) -> dict[str, Any]:
    """From (wall, cpu, real tokens) at the end of each step (index 0 = before step 1): the timed window."""
    start, end = marks[warmup], marks[-1]
    steps = len(marks) - 1 - warmup
    wall, cpu = end[0] - start[0], end[1] - start[1]
    step_s = [b[0] - a[0] for a, b in zip(marks[warmup:-1], marks[warmup + 1:], strict=True)]
    return {"timed_steps": steps, "s_per_step": round(wall / steps, 4),
            "median_s_per_step": round(statistics.median(step_s), 4),
            "tokens_per_s": round(sum(m[2] for m in marks[warmup + 1:]) / wall, 2),
            "cpu_s_per_step": None if device.startswith("cuda") else round(cpu / steps, 4)}


def planned_state_bytes(config: Any, device: str) -> float | None:
    """`tailor plan`'s optimizer state for this run (device and host parts together), or None."""
    from tailor.models import resolve_model
    from tailor.plan.catalogue import resolve_model as plan_architecture
    from tailor.plan.memory import estimate_memory
    from tailor.plan.planner import train_config_setup

    where = "cuda" if device.startswith("cuda") else "cpu"
    try:
        arch = plan_architecture(str(resolve_model(config.model).directory / "config.json"))
        breakdown = estimate_memory(arch, train_config_setup(config, where), where)
    except (ValueError, KeyError):
        return None
    return breakdown.optimizer_state + breakdown.host_optimizer_state


def run_config(args: argparse.Namespace, name: str, device: str) -> dict[str, Any]:
    import torch

    from tailor.loss import validation_loss
    from tailor.methods import get_method
    from tailor.models import load_model
    from tailor.train import fit
    from tailor.train.hooks import Hook, MetricsHook
    from tailor.train.optimizers import optimizer_state_nbytes
    from tailor.train.run import seed_everything

    run_dir = tempfile.mkdtemp(prefix=f"optimizers-{name}-")
    config = train_config(args, "lora", device, run_dir).replace(optimizer=name).validate()
    method = get_method("lora")
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, dtype=method.train_dtype(config.precision), device=device)
    train_set, eval_set = load_data(args, tokenizer)
    seed_everything(args.seed)  # the same adapter init for every configuration
    model = method.prepare(model, config)

    marks = [(time.perf_counter(), time.process_time(), 0)]
    last = {"loss": math.nan, "state_bytes": None}

    class StepClock(Hook):
        def on_step(self, run: Any, record: Any) -> None:
            synchronize(device)
            marks.append((time.perf_counter(), time.process_time(), record.tokens))
            last["loss"] = record.loss
            if last["state_bytes"] is None:  # allocated at the first step, fixed size after it
                last["state_bytes"] = optimizer_state_nbytes(run.optimizer)

    peak = TrainingPeak()
    peak.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes on a CPU: "paged optimizers are not supported"
        fit(model, train_set, [], config, Path(run_dir), tokenizer.pad_token_id, lambda _m, _d: None,
            hooks=[MetricsHook(), StepClock()])
    result = summarise(marks, args.warmup, device)
    planned = planned_state_bytes(config, device)
    result.update(optimizer_state_bytes=last["state_bytes"],
                  planned_state_bytes=None if planned is None else round(planned),
                  peak_rss_mib=peak_rss_mib(), train_peak_rss_mib=peak.read_mib(),
                  last_train_loss=round(float(last["loss"]), 5),
                  val_loss=round(validation_loss(model, eval_set, args.batch_size, tokenizer.pad_token_id,
                                                 config.precision), 5))
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def child_main(args: argparse.Namespace) -> None:
    import torch

    device = pick_device(args.device)
    set_threads(args.threads)
    started = time.perf_counter()
    try:
        result = run_config(args, args.child, device)
        result["status"] = "ok"
    except ImportError as error:  # bitsandbytes not installed
        result = {"status": "unavailable", "error": f"{type(error).__name__}: {error}"}
    result.update(config=args.child, device=device, threads=torch.get_num_threads(),
                  child_wall_s=round(time.perf_counter() - started, 1))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def compare(results: dict[str, dict[str, Any]]) -> None:
    """Each configuration's median step, CPU step and optimizer state over adamw's, in place."""
    reference = results.get(REFERENCE, {})
    for r in results.values():
        if r.get("status") != "ok" or reference.get("status") != "ok":
            continue
        for key, ratio in (("median_s_per_step", "step_ratio"), ("cpu_s_per_step", "cpu_step_ratio"),
                           ("optimizer_state_bytes", "state_ratio")):
            if r.get(key) and reference.get(key):
                r[ratio] = round(r[key] / reference[key], 4)


def cell(r: dict[str, Any], key: str, width: int, fmt: str, scale: float = 1.0) -> str:
    value = r.get(key)
    return format(value / scale, fmt).rjust(width) if isinstance(value, (int, float)) else "-".rjust(width)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = (f"{'optimizer':<18}{'s/step':>8}{'median':>8}{'cpu s/step':>11}{'tokens/s':>10}{'x adamw':>8}"
              f"{'state MiB':>10}{'planned':>9}{'x adamw':>8}{'peak RSS':>9}{'train RSS':>10}{'val loss':>9}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{name:<18}{r.get('status', 'failed')}: {r.get('error', '')}"[:200])
            continue
        lines.append(
            f"{name:<18}{cell(r, 's_per_step', 8, '.3f')}{cell(r, 'median_s_per_step', 8, '.3f')}"
            f"{cell(r, 'cpu_s_per_step', 11, '.3f')}{cell(r, 'tokens_per_s', 10, '.1f')}"
            f"{cell(r, 'step_ratio', 8, '.3f')}{cell(r, 'optimizer_state_bytes', 10, '.2f', 2**20)}"
            f"{cell(r, 'planned_state_bytes', 9, '.2f', 2**20)}{cell(r, 'state_ratio', 8, '.3f')}"
            f"{cell(r, 'peak_rss_mib', 9, '.0f')}{cell(r, 'train_peak_rss_mib', 10, '.0f')}"
            f"{cell(r, 'val_loss', 9, '.4f')}")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    set_threads(args.threads)  # the children's count, so that the machine line says what they run with
    machine = print_machine(pick_device(args.device))
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {}
    for name in args.config_list:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_child(__file__, name, argv, args.timeout, RESULT_MARKER)
    compare(results)
    print(format_table(results))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average {load_before and [round(x, 2) for x in load_before]} -> "
          f"{load_after and [round(x, 2) for x in load_after]}")
    report = {**machine, "configs": results,
              "settings": {k: getattr(args, k) for k in (
                  "model", "data", "steps", "warmup", "batch_size", "max_seq_len", "rank", "lora_alpha", "lr",
                  "seed", "train_examples", "eval_examples")},
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
