"""What the benchmarks share: the machine they ran on (every benchmark prints it first and writes it in its
JSON), and for the training ones the recipe's command-line options, device and thread set-up, the recipe as
a TrainConfig, the data, peak-memory readings, and running one configuration in a child process.

Imported by the benchmark scripts beside it (`python benchmarks/NAME.py` puts this folder on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from tailor.names import DEFAULT_MODEL  # what `tailor train` trains by default


def machine_info(device: str | None = None) -> dict[str, Any]:
    """The machine a benchmark ran on, as tailor.hardware sees it: torch's CPU capability, whether `device`
    (default: cuda when available) computes bf16 natively, the precision `auto` resolves to there, torch's
    threads (call after setting them) and torch's version. A bf16 number from a CPU without native bf16 is
    ~100x off one with it: every result says which machine it comes from."""
    import torch

    from tailor import hardware

    precision = hardware.resolve_precision("auto", device)
    return {"cpu_capability": precision.cpu_capability, "native_bf16": precision.native_bf16,
            "precision": precision.resolved, "threads": torch.get_num_threads(), "torch": torch.__version__}


def print_machine(device: str | None = None) -> dict[str, Any]:
    """Print `machine_info(device)` as one line (a benchmark's first) and return it for the JSON."""
    info = machine_info(device)
    print(f"machine: {info['cpu_capability']}, native bf16 {'yes' if info['native_bf16'] else 'no'}, "
          f"precision auto -> {info['precision']}, {info['threads']} thread{'s' * (info['threads'] != 1)}, "
          f"torch {info['torch']}",
          flush=True)
    return info


def add_recipe_args(p: argparse.ArgumentParser, configs: tuple[str, ...], steps: int, train_examples: int,
                    eval_examples: int, timeout: float, train_examples_help: str = "",
                    configs_help: str = "") -> None:
    """The options every training benchmark takes: model, data, configurations, steps, the LoRA recipe."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local path (tailor.models)")
    p.add_argument("--data", default="builtin:support", help="training data spec (tailor.data)")
    p.add_argument("--configs", default=",".join(configs),
                   help=f"comma-separated subset of {', '.join(configs)}" + (f" ({configs_help})"
                                                                             if configs_help else ""))
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=train_examples,
                   help=train_examples_help or "first N examples of the training data")
    p.add_argument("--eval-examples", type=int, default=eval_examples,
                   help="validation examples for the final loss")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    p.add_argument("--timeout", type=float, default=timeout, help="seconds per configuration run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one configuration


def config_list(p: argparse.ArgumentParser, args: argparse.Namespace, valid: tuple[str, ...]) -> list[str]:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in valid]
    if unknown or not configs:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {', '.join(valid)}")
    return configs


def pick_device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_config(args: argparse.Namespace, method: str, device: str, run_dir: str, share_prefix: bool = True):
    """The one recipe every configuration follows (PEFT loops read lr/clip/AdamW settings from it). Its
    precision is what the trainer's `auto` runs on `device` (bf16 where native, else fp32), given resolved
    so that the recipe reads the same whichever TrainConfig default and choices are installed."""
    from tailor.hardware import resolve_precision
    from tailor.train import TrainConfig

    return TrainConfig(
        method=method, model=args.model, data=args.data, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, rank=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
        target_modules="all-linear",
        lr=args.lr, schedule="constant", warmup_steps=0, seed=args.seed, max_steps=args.warmup + args.steps,
        device=device, num_threads=args.threads, eval_every=0, save_every=0, keep_best=False, progress=False,
        log_every=1, out=run_dir, share_prefix=share_prefix,
        precision=resolve_precision("auto", device).resolved,
    ).validate()


def load_data(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """Tokenized (train, eval) examples: the first --train-examples of the data, and the first
    --eval-examples of its validation split."""
    from tailor.data import load_examples, tokenize_examples

    train_examples = load_examples(args.data)[: args.train_examples]
    val_spec = f"{args.data}:validation" if args.data.startswith("builtin:") else args.data
    eval_examples = load_examples(val_spec)[: args.eval_examples]
    train_set, _ = tokenize_examples(train_examples, tokenizer, args.max_seq_len)
    eval_set, _ = tokenize_examples(eval_examples, tokenizer, args.max_seq_len)
    return train_set, eval_set


class TrainingPeak:
    """Peak RSS of the training phase alone: Linux lets a process reset its high-water mark
    (write 5 to /proc/self/clear_refs), so loading the model does not count."""

    def __init__(self) -> None:
        self.available = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.available = True
        except OSError:
            self.available = False

    def read_mib(self) -> float | None:
        if not self.available:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 / (1024 if sys.platform == "darwin" else 1), 1)  # macOS reports bytes


def run_child(script: str, name: str, argv: list[str], timeout: float, marker: str) -> dict[str, Any]:
    """Run `script ARGV --child NAME` in a new process; its result is the JSON after `marker` on stdout."""
    command = [sys.executable, os.path.abspath(script), *argv, "--child", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
    return {"config": name, "status": "failed", "error": f"exit {done.returncode}: " + " | ".join(tail)}
