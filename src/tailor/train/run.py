"""`tailor train` end to end: config -> data -> model -> fit -> run directory.

Run directory (runs/<name>/ or --out):
  config.yaml    the resolved TrainConfig
  adapter/       the trained LoRA adapter, PEFT format (method=lora); model/ holds the weights for method=full
  best/          the lowest-validation-loss weights seen (keep_best)
  checkpoints/   resumable training state (see checkpoint.py)
  metrics.jsonl  one line per step: step, loss, lr, tokens, tokens_per_s, elapsed[, val_loss]
  loss.png       training (and validation) loss curve
  summary.json   data statistics, speed, memory, parameter counts, final losses
  report.md      human-readable report (tailor.report); eval results are added by `tailor demo`/`eval`
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tailor.config import ConfigError, TrainConfig, save_config
from tailor.data.canaries import CANARY_FILE, CANARY_WARNING
from tailor.data.sources import data_record as data_sources_record
from tailor.files import OutputPathError, atomic_output, atomic_write_json, check_output_path, directory_size
from tailor.methods import get_method
from tailor.names import RUN_CONFIG_NAME
from tailor.train.distributed import (
    full_parameters,
    is_main_process,
    join_processes,
    leave_processes,
    world_size,
    wrapper_for,
)
from tailor.train.hooks import Hook, TrackerHook
from tailor.train.loop import FitResult, fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB), and CUDA peak allocation when on a GPU."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # macOS reports bytes
        rss_kib //= 1024
    out = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def use_threads(config: TrainConfig) -> None:
    """Set torch's threads for a run of `config`: its num_threads, else this process's share of the cores
    (processes on one machine share them; torchrun says how many run here)."""
    cores_here = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(config.num_threads or max(1, cores_here))


def load_data(config: TrainConfig) -> tuple[list, list]:
    """Load and split the train/validation examples (no tokenizer needed): bad data is found here, early.
    Several sources are mixed by weight (tailor.data.sources)."""
    from tailor.data.sources import load_sources

    if config.objective != "sft":
        return load_preference_data(config)
    return load_sources(config.data, config.val_data, config.val_fraction, config.format, config.columns,
                        config.seed)


def load_preference_data(config: TrainConfig) -> tuple[list, list]:
    """The (train, validation) preference pairs of a dpo/orpo run: validation from val_data, a builtin
    set's validation split, or a seeded val_fraction of the data (tailor.data.preferences)."""
    from tailor.data import DataError, DataIssue, split_examples
    from tailor.data.preferences import load_preferences

    spec = config.data if isinstance(config.data, str) else None
    if spec is None:
        raise DataError(DataIssue("data", f"objective {config.objective} reads one preference source (a file "
                                  "of prompt, chosen, rejected records); several mixed are for sft."))
    train = load_preferences(spec)
    if config.val_data:
        return train, load_preferences(config.val_data)
    if spec.startswith("builtin:") and config.val_fraction > 0:
        return train, load_preferences(f"builtin:{spec.split(':')[1]}:validation")
    if config.val_fraction > 0:
        try:
            return split_examples(train, config.val_fraction, config.seed)
        except ValueError:
            raise DataError(DataIssue(spec, f"{len(train)} pair(s) are too few to hold out a validation "
                                      "split.", "add pairs, or pass --val-data FILE (or set val_fraction=0).")
                            ) from None
    return train, []


def prepare_data(config: TrainConfig, tokenizer: Any,
                 examples: tuple[list, list] | None = None) -> tuple[list, list, dict[str, Any]]:
    """Load (unless `examples` = load_data's result is given), split and tokenize train/validation
    examples; returns (train, val, stats)."""
    from tailor.data import tokenize_examples
    from tailor.data.preferences import tokenize_pairs

    tokenize = tokenize_examples if config.objective == "sft" else tokenize_pairs
    train_examples, val_examples = examples if examples is not None else load_data(config)
    train_set, train_stats = tokenize(train_examples, tokenizer, config.max_seq_len, config.overflow)
    val_set, val_stats = tokenize(val_examples, tokenizer, config.max_seq_len, config.overflow) \
        if val_examples else ([], None)
    stats = {"train": _stats_dict(train_stats), "validation": _stats_dict(val_stats) if val_stats else None}
    return train_set, val_set, stats


def _stats_dict(stats: Any) -> dict[str, Any]:
    keys = ("n_in", "n_kept", "n_truncated", "n_dropped", "n_tokens", "n_supervised_tokens")
    return {k: getattr(stats, k) for k in keys if hasattr(stats, k)}


def train(config: TrainConfig, extra_hooks: Sequence[Hook] = ()) -> Path:
    """Run a whole training job per `config`; returns the run directory. `extra_hooks` observe the steps.

    Started by torchrun (several processes), every process runs this same function: each trains on its
    share of every batch (tailor.train.distributed), and rank 0 alone writes the run directory."""
    examples = check_before_training(config)
    # every process checks the run directory before joining, and rank 0 writes into it only after all
    # have joined: no process can find the run of its own job there and refuse it
    device = join_processes(config.device, config.timeout)
    try:
        return _train(config, examples, device, extra_hooks)
    finally:
        leave_processes()


def check_before_training(config: TrainConfig) -> tuple[list, list]:
    """Refuse a bad config, run directory or data before any model is loaded (and, with --nproc, before
    any process is started); returns the loaded (train, validation) examples."""
    config.validate()
    get_method(config.method)
    if config.optimizer != "adamw":  # the 8-bit optimizers are bitsandbytes'
        from tailor.quant.bnb import require_bitsandbytes

        require_bitsandbytes(config.optimizer, what="optimizer")
    check_run_dir(config.run_dir(), config.resume)
    if config.init_adapter is not None:  # a wrong adapter directory is found before the model loads
        from tailor.adapters import read_adapter_config

        read_adapter_config(config.init_adapter)
    if config.replay_prompts:
        from tailor.train.replay import load_replay_prompts

        load_replay_prompts(config.replay_prompts)
    return load_data(config)  # bad data stops the run here: before the model load, nothing written


def _train(config: TrainConfig, examples: tuple[list, list], device: str | None,
           extra_hooks: Sequence[Hook]) -> Path:
    from tailor.hardware import resolve_base_dtype, resolve_precision
    from tailor.lora import trainable_parameters
    from tailor.train.plot import plot_losses

    # auto becomes bf16 or fp32 here, once: config.yaml, the trainer and report.md all see the resolved value
    precision = resolve_precision(config.precision, device)
    method = get_method(config.method)
    sharded = world_size() > 1 and config.strategy == "fsdp"
    try:
        base_dtype = resolve_base_dtype(config.base_dtype, precision.resolved, method.float_base, sharded)
    except ValueError as error:
        raise ConfigError(f"base_dtype: {error}") from None
    config = config.replace(precision=precision.resolved, base_dtype=base_dtype.resolved)
    if is_main_process():
        print(f"precision: {precision.reason}", flush=True)
        print(f"base_dtype: {base_dtype.reason}", flush=True)
    run_dir = config.run_dir()
    data_record = data_sources_record(config.data, config.val_data, examples)
    replay_record = None
    task_examples = examples[0]  # the task's own, before replayed answers join: its routing description
    if config.replay_ratio > 0:  # the base model's own answers, mixed in (tailor.train.replay)
        from tailor.train.replay import REPLAY_PROMPTS, load_replay_prompts, mix_replay, replay_examples

        prompts = load_replay_prompts(config.replay_prompts) if config.replay_prompts else REPLAY_PROMPTS
        replayed, replay_record = replay_examples(config.model, prompts, device=config.device)
        examples = (mix_replay(examples[0], replayed, config.replay_ratio), examples[1])
        mixed_in = len(examples[0]) - data_record["examples"]["train"]
        replay_record.update(ratio=config.replay_ratio, mixed_in=mixed_in)
    examples, canaries = _with_canaries(config, examples)
    main = is_main_process()
    use_threads(config)
    seed_everything(config.seed)  # the same seed everywhere: every process starts from the same weights

    started = time.perf_counter()
    # stored as the method trains on it (QLoRA: quantized as read), never wider first (tailor.models.lean)
    stored = method.stored_dtype(config.precision, config.base_dtype)  # bf16 weights computing in fp32
    model, tokenizer = method.load_base(config.model, method.train_dtype(config.precision, config.base_dtype),
                                        device, stored=stored)
    load_seconds = time.perf_counter() - started
    train_set, val_set, data_stats = prepare_data(config, tokenizer, examples)
    seed_everything(config.seed)  # adapter init independent of how much randomness data prep used
    model = method.prepare(model, config)
    if main:  # only now, with the data, the model and the method known good, is the run directory written
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / RUN_CONFIG_NAME,
                    note=f"precision: {precision.reason}\nbase_dtype: {base_dtype.reason}")
        if canaries is not None:
            atomic_write_json(run_dir / CANARY_FILE, canaries)

    def save_weights(trained: nn.Module, directory: Path) -> Path:
        return method.save(trained, directory, tokenizer)

    trainable, total = trainable_parameters(model)
    frozen_bytes = method.frozen_weight_bytes(model)
    tracking = TrackerHook() if config.report_to else None  # tailor.trackers (report_to)
    cpu_started = time.process_time()
    result = fit(model, train_set, val_set, config, run_dir, tokenizer.pad_token_id, save_weights,
                 extra_hooks=[*extra_hooks, *([tracking] if tracking else [])],
                 wrap=wrapper_for(config.strategy))
    # CPU seconds (all threads) next to wall seconds: on a shared machine wall time overstates the cost
    cpu_seconds = time.process_time() - cpu_started

    out_dir = method.deliverable_dir(run_dir)
    best = run_dir / "best"
    use_best = (config.keep_best and result.state.best_step is not None and best.exists()
                and result.state.best_step != result.state.step)
    with full_parameters(result.module):  # under FSDP every process gathers the weights; rank 0 writes
        if main and not use_best:
            save_weights(model, out_dir)
    if not main:
        return run_dir
    if use_best:
        with atomic_output(out_dir, directory=True) as tmp:
            shutil.copytree(best, tmp, dirs_exist_ok=True)

    summary = build_summary(config, result, data_stats, trainable, total, out_dir, load_seconds, use_best)
    summary.update(planned_against_measured(config, device, summary))
    summary.update(cpu_seconds=round(cpu_seconds, 1), frozen_weight_bytes=frozen_bytes, replay=replay_record,
                   data_sources=data_record, canaries=_canary_note(canaries),
                   precision=precision.as_dict(), base_dtype=base_dtype.as_dict())
    if method.spec.deliverable == "adapter":  # the adapter carries what made it (tailor_metadata.json)
        from tailor.adapters.metadata import update_metadata

        metrics = {k: summary[k] for k in METADATA_METRICS if summary.get(k) is not None}
        update_metadata(out_dir, train_config=config.to_dict(), data=data_record, metrics=metrics,
                        routing=routing_description(model, tokenizer, task_examples, sharded),
                        **({"canaries": _canary_note(canaries)} if canaries else {}))
        summary["weights_bytes"] = directory_size(out_dir)  # the artifact as shipped, metadata included
        if config.register:
            from tailor.adapters.store import AdapterStore

            store = AdapterStore()
            summary["registered_as"], _ = store.add(config.register, out_dir)
            print(f"registered {out_dir} as {summary['registered_as']} (store {store.root})", flush=True)
    atomic_write_json(run_dir / "summary.json", summary)
    if tracking is not None:
        tracking.finish(summary, out_dir)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    from tailor.report import write_report

    write_report(run_dir)
    return run_dir


def _with_canaries(config: TrainConfig, examples: tuple[list, list]) -> tuple[tuple[list, list], dict | None]:
    """`config.canaries` fake secrets planted in a copy of the training examples (tailor.data.canaries; the
    user's data and the validation split untouched), and the record canaries.json keeps of them."""
    from tailor.data.canaries import canary_copies, make_canaries, plant_canaries

    if not config.canaries:
        return examples, None
    train_examples, val_examples = examples
    system = next((m["content"] for e in train_examples for m in (e.messages or [])[:1]
                   if m["role"] == "system"), None)
    canaries = make_canaries(config.canaries, config.seed, system)
    read = (config.max_steps * config.batch_size * config.grad_accum if config.max_steps
            else config.epochs * len(train_examples))
    copies = canary_copies(len(train_examples), read)
    planted = plant_canaries(train_examples, canaries, copies)
    if is_main_process():
        print(f"canaries: {len(canaries)} fake secrets planted, {copies} copies each, in a copy of the "
              f"training data ({CANARY_FILE}); do not ship this adapter", flush=True)
    record = {"n": len(canaries), "copies": copies, "seed": config.seed,
              "note": CANARY_WARNING, "canaries": [c.as_dict() for c in canaries]}
    return (planted, val_examples), record


def _canary_note(canaries: dict | None) -> dict | None:
    """What summary.json and the adapter's metadata say of planted canaries (None when there are none)."""
    if not canaries:
        return None
    return {"n": canaries["n"], "copies": canaries["copies"], "file": CANARY_FILE, "note": CANARY_WARNING}


def planned_against_measured(config: TrainConfig, device: str | None, summary: dict[str, Any]) -> dict:
    """`tailor plan`'s peak for this run beside the measured one (printed, and kept in summary.json):
    planned_peak_gib, peak_rss_gib, and on CUDA peak_cuda_gib (the allocator's peak)."""
    from tailor.hardware import default_device
    from tailor.models import resolve_model
    from tailor.plan.planner import planned_peak_gib

    where = "cuda" if str(device or default_device()).startswith("cuda") else "cpu"
    planned = planned_peak_gib(config, where, str(resolve_model(config.model).directory / "config.json"))
    out = {"planned_peak_gib": None if planned is None else round(planned, 3),
           "peak_rss_gib": round(summary["peak_rss_mib"] / 1024, 3)}
    measured = out["peak_rss_gib"]
    if "cuda_max_allocated_mib" in summary:
        out["peak_cuda_gib"] = measured = round(summary["cuda_max_allocated_mib"] / 1024, 3)
    if planned is not None:
        kind = "peak CUDA allocation" if where == "cuda" else "peak RSS"
        print(f"memory: planned {planned:.2f} GiB, measured {measured:.2f} GiB {kind} "
              f"({100 * (measured - planned) / planned:+.0f}%)", flush=True)
    return out


METADATA_METRICS = ("final_train_loss", "final_val_loss", "best_val_loss", "best_step", "steps", "tokens",
                    "train_seconds", "tokens_per_s", "trainable_params")


def routing_description(model: nn.Module, tokenizer: Any, examples: list, sharded: bool) -> dict | None:
    """What the adapter was trained on, for `model: "auto"` in `tailor serve` (tailor.routing): the base
    model's view of a sample of the training prompts (an embedding lookup, under a second); None for a
    sharded run (describe it with `tailor adapters describe`) or data without prompts."""
    from tailor.routing.describe import describe_training

    if sharded:
        print("routing: not described in a sharded run; run `tailor adapters describe` on the adapter",
              flush=True)
        return None
    return describe_training(model, tokenizer, examples)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run directory that would lose or mix what is there (a file, another run, other files)."""
    try:  # a file where the run directory (or one of its parents) goes; no permission to write there
        check_output_path(run_dir, directory=True)
    except OutputPathError as error:
        raise ConfigError(f"out: {error} (--out DIR)") from None
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / RUN_CONFIG_NAME).exists()
    if holds_run and not resume:
        # a finished or killed run lives here; refusing beats silently mixing two runs' metrics
        raise ConfigError(f"out: {run_dir} already holds a run; use --resume to continue it, or --out DIR")
    if not holds_run:
        raise ConfigError(f"out: {run_dir} is not empty and holds no tailor run; nothing there is touched. "
                          "Give a new or empty directory (--out DIR).")


def build_summary(config: TrainConfig, result: FitResult, data_stats: dict[str, Any], trainable: int,
                  total: int, out_dir: Path, load_seconds: float, used_best: bool) -> dict[str, Any]:
    state = result.state
    last_loss = None
    metrics_path = out_dir.parent / "metrics.jsonl"
    if metrics_path.exists():
        lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        if lines:
            last_loss = lines[-1].get("loss")
    return {
        "method": config.method,
        "model": config.model,
        "data": data_stats,
        "steps": state.step,
        "epochs_seen": state.epoch + (1 if state.batch_in_epoch else 0),
        "train_seconds": round(state.elapsed, 2),
        "model_load_seconds": round(load_seconds, 2),
        "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens,
        "tokens_per_s": round(state.tokens / state.elapsed, 1) if state.elapsed else None,
        "final_train_loss": last_loss,
        "final_val_loss": result.final_val_loss,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "final_weights": "best" if used_best else "last",
        "trainable_params": trainable,
        "total_params": total,
        "weights_dir": out_dir.name,
        "weights_bytes": directory_size(out_dir),
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "device": str(config.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "processes": world_size(),
        "strategy": config.strategy if world_size() > 1 else None,
        "num_threads": torch.get_num_threads(),
        **peak_memory(),
    }
