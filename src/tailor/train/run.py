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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tailor.train.config import TrainConfig, save_config
from tailor.train.loop import FitResult, fit

# Precision policy (why): on CPUs with AMX and on GPUs bf16 matmuls are several times faster than fp32.
# LoRA: the frozen base is *stored* in bf16 (half the memory, no per-step weight casts), the adapter
#   weights stay fp32 (they are the optimizer's master copy) and autocast runs their matmuls in bf16.
# Full fine-tuning: weights and AdamW moments stay fp32 (bf16 weights would swallow small updates);
#   autocast computes in bf16. Memory is therefore 16 bytes per parameter for full FT.


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


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def prepare_data(config: TrainConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """Load, split and tokenize train/validation examples; returns (train, val, stats)."""
    from tailor.data import load_examples, split_examples, tokenize_examples

    train_examples = load_examples(config.data, config.format)
    if config.val_data:
        val_examples = load_examples(config.val_data, config.format)
    elif str(config.data).startswith("builtin:") and config.val_fraction > 0:
        name = str(config.data).split(":")[1]
        val_examples = load_examples(f"builtin:{name}:validation", config.format)
    elif config.val_fraction > 0:
        train_examples, val_examples = split_examples(train_examples, config.val_fraction, config.seed)
    else:
        val_examples = []
    train_set, train_stats = tokenize_examples(train_examples, tokenizer, config.max_seq_len, config.overflow)
    val_set, val_stats = tokenize_examples(val_examples, tokenizer, config.max_seq_len, config.overflow) \
        if val_examples else ([], None)
    stats = {"train": _stats_dict(train_stats), "validation": _stats_dict(val_stats) if val_stats else None}
    return train_set, val_set, stats


def _stats_dict(stats: Any) -> dict[str, Any]:
    keys = ("n_in", "n_kept", "n_truncated", "n_dropped", "n_tokens", "n_supervised_tokens")
    return {k: getattr(stats, k) for k in keys if hasattr(stats, k)}


def prepare_model(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Apply the precision policy, add LoRA (method=lora) or unfreeze all (method=full), and
    gradient checkpointing."""
    if config.method == "lora":
        from tailor.lora import LoraConfig, add_lora

        if config.precision == "bf16":
            model.to(torch.bfloat16)
        lora_config = LoraConfig(
            r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.target_modules, use_rslora=config.use_rslora,
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or config.model,
            task_type="CAUSAL_LM",
        )
        add_lora(model, lora_config)
    else:
        model.to(torch.float32)
        for p in model.parameters():
            p.requires_grad_(True)
    if next(model.parameters()).device.type == "cpu" and hasattr(model, "set_attn_implementation"):
        # On CPU, transformers' SDPA path costs ~20% of a step at these lengths; eager attention measured
        # +9% tokens per CPU-second alone and +27% with the autocast fix in lora/layer.py (benchmarks/).
        model.set_attn_implementation("eager")
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of storing its activations (non-reentrant:
    works with a frozen embedding, whose output does not require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def weight_saver(config: TrainConfig, tokenizer: Any):
    """The function that writes the deliverable weights: PEFT adapter, or the full HF model."""
    if config.method == "lora":
        from tailor.adapters import save_adapter

        return lambda model, directory: save_adapter(model, directory)

    def save_full(model: nn.Module, directory: Path) -> None:
        tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    return save_full


def deliverable_dir(config: TrainConfig, run_dir: Path) -> Path:
    return run_dir / ("adapter" if config.method == "lora" else "model")


def train(config: TrainConfig) -> Path:
    """Run a whole training job per `config`; returns the run directory."""
    from tailor.models import load_model
    from tailor.train.plot import plot_losses

    config.validate()
    run_dir = config.run_dir()
    if run_dir.exists() and (run_dir / "metrics.jsonl").exists() and not config.resume:
        # a finished or killed run lives here; refusing beats silently mixing two runs' metrics
        from tailor.train.config import ConfigError

        raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it, or --out DIR")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
    seed_everything(config.seed)
    save_config(config, run_dir / "config.yaml")

    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=torch.float32, device=config.device)
    load_seconds = time.perf_counter() - started
    train_set, val_set, data_stats = prepare_data(config, tokenizer)
    seed_everything(config.seed)  # adapter init independent of how much randomness data prep used
    model = prepare_model(config, model)
    save_weights = weight_saver(config, tokenizer)

    from tailor.lora import trainable_parameters

    trainable, total = trainable_parameters(model)
    cpu_started = time.process_time()
    result = fit(model, train_set, val_set, config, run_dir, tokenizer.pad_token_id, save_weights)
    # CPU seconds (all threads) next to wall seconds: on a shared machine wall time overstates the cost
    cpu_seconds = time.process_time() - cpu_started

    out_dir = deliverable_dir(config, run_dir)
    best = run_dir / "best"
    use_best = (config.keep_best and result.state.best_step is not None and best.exists()
                and result.state.best_step != result.state.step)
    if use_best:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    else:
        save_weights(model, out_dir)

    summary = build_summary(config, result, data_stats, trainable, total, out_dir, load_seconds, use_best)
    summary["cpu_seconds"] = round(cpu_seconds, 1)
    write_json(run_dir / "summary.json", summary)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    from tailor.report import write_report

    write_report(run_dir)
    return run_dir


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
        "weights_bytes": dir_size(out_dir),
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "device": str(config.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "num_threads": torch.get_num_threads(),
        **peak_memory(),
    }


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
