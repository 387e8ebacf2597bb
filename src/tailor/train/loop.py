"""The training loop: AdamW (tailor.train.optimizers) on the trainable parameters, warmup + decay,
accumulation, clipping, bf16 autocast; everything around the step (validation, keep-best, metrics, progress,
checkpoints) is a hook.

It knows nothing about where the model or the data come from: `fit` takes a prepared model, tokenized
examples and a run directory (run.py is the whole `tailor train` pipeline). The same loop runs in one
process or in several (torchrun): the loss module may be wrapped by DDP or FSDP (`wrap`), token counts
are summed across processes, and only rank 0 runs hooks that write files.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tailor.config import TrainConfig
from tailor.files import remove_stale_temporaries
from tailor.loss import CausalLMLoss, Tokenized, collate_batch, compute_context, count_supervised
from tailor.loss.preference import REFERENCE_ADAPTER, PreferenceLoss, count_pairs
from tailor.loss.replay import replay_loss_for
from tailor.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint
from tailor.train.distributed import (
    is_main_process,
    share_of_batch,
    sum_across_processes,
    whole_tensor,
    world_size,
)
from tailor.train.hooks import Hook, StepRecord, TrainingRun, default_hooks
from tailor.train.optimizers import make_optimizer
from tailor.train.schedule import learning_rate, warmup_steps_for


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stopped, the last good checkpoint stays."""


def total_steps_for(config: TrainConfig, n_examples: int) -> int:
    """max_steps when given, else enough optimizer steps for `epochs` passes over the data (a batch is
    batch_size examples in each process)."""
    if config.max_steps:
        return config.max_steps
    batches_per_epoch = math.ceil(n_examples / (config.batch_size * world_size()))
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))


class BatchStream:
    """Batches of example indices, epoch after epoch, with a position that can be saved and restored.

    The order of epoch e is tailor.data.batch_indices(lengths, batch_size, seed, e): a pure function of
    (seed, epoch), so (epoch, batch_in_epoch) is all a checkpoint needs to continue the same sequence.
    Batches smaller than `min_size` (the epoch's last, when it holds fewer examples than there are
    processes to share it) are skipped: every process needs at least one example.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 epoch: int = 0, batch_in_epoch: int = 0, min_size: int = 1):
        if len(lengths) < min_size:
            raise ValueError(f"{len(lengths)} training example(s) cannot be shared by {min_size} processes; "
                             "give more examples or fewer processes (--nproc)")
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.min_size = min_size
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._order = self._batches(epoch)

    def _batches(self, epoch: int) -> list[list[int]]:
        from tailor.data import batch_indices

        return batch_indices(self.lengths, self.batch_size, self.seed, epoch, group_by_length=self.group)

    def next(self) -> list[int]:
        if self.batch_in_epoch >= len(self._order):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        batch = self._order[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return batch if len(batch) >= self.min_size else self.next()


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
    grads = [p for p in model.parameters() if p.grad is not None]
    return float(whole_tensor(torch.nn.utils.clip_grad_norm_(grads, max_norm)))  # FSDP: a DTensor norm


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], lr: float,
               config: TrainConfig) -> tuple[float, float | None, int, int]:
    """One optimizer step over `micro_batches`; returns (loss, grad norm, tokens, supervised tokens).

    loss = (sum of token CE over the micro-batches of all processes) / (their supervised tokens), so
    accumulation k x batch b, and p processes x batch b, both equal one batch of k*b (p*b) exactly.
    DDP averages gradients over processes, hence the factor world_size in each part's scale. A preference
    objective's loss is summed over pairs and divided by the pairs (tailor.loss.preference).
    """
    for group in optimizer.param_groups:  # LoRA+ groups learn at a multiple of the schedule's rate
        group["lr"] = lr * group.get("lr_scale", 1.0)
    device = micro_batches[0]["input_ids"].device
    per_pair = config.objective != "sft"
    counts = torch.tensor([sum(count_supervised(b["labels"]) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches),
                           sum(count_pairs(b) for b in micro_batches) if per_pair else 0])
    n_supervised, n_tokens, n_pairs = (int(x) for x in sum_across_processes(counts))
    divisor = n_pairs if per_pair else n_supervised
    scale = world_size() / max(divisor, 1)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP: gradients are all-reduced only on the last micro-batch of the step
        no_sync = module.no_sync() if not last and hasattr(module, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with compute_context(device, config.precision):
                part, _ = module(batch)
            (part * scale).backward()
        loss_sum += part.detach()
    loss = float(sum_across_processes(loss_sum)) / max(divisor, 1)  # the one host sync per step
    grad_norm = clip_gradients(module, config.max_grad_norm) if config.max_grad_norm is not None else None
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise NonFiniteLossError(f"{what} is not finite")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, n_tokens, n_supervised


def reference_for(model: nn.Module) -> nn.Module | str:
    """DPO's reference for `model` as training starts: its starting adapter kept frozen beside the trained
    one ("adapter"), the base under a new adapter ("disable"), or for full fine-tuning a frozen copy."""
    import copy

    from tailor.lora import lora_configs

    adapters = lora_configs(model)
    if REFERENCE_ADAPTER in adapters:
        return "adapter"
    if adapters:
        return "disable"
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen


@dataclass
class FitResult:
    state: TrainState
    final_val_loss: float | None
    total_steps: int
    resumed_from: Path | None
    module: nn.Module | None = None  # the training module as wrapped (DDP, FSDP): saves gather through it


def fit(model: nn.Module, train_set: Sequence[Tokenized], val_set: Sequence[Tokenized], config: TrainConfig,
        run_dir: Path, pad_id: int, save_weights: Callable[[nn.Module, Path], Any],
        hooks: Sequence[Hook] | None = None, extra_hooks: Sequence[Hook] = (),
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        examples_for_this_process: Callable[[list[int]], list[int]] | None = None) -> FitResult:
    """Train `model` in place on `train_set` per `config`; hooks write metrics and checkpoints to `run_dir`.

    `save_weights(model, dir)` writes the deliverable (used by keep-best). `hooks` replaces the default
    set (tailor.train.hooks.default_hooks), `extra_hooks` runs after it. `wrap` wraps the loss module
    (DDP, FSDP); `examples_for_this_process` picks this process's share of each global batch's indices
    (default: tailor.train.distributed.share_of_batch).
    """
    if not train_set:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    run_dir.mkdir(parents=True, exist_ok=True)
    total = total_steps_for(config, len(train_set))
    warmup = warmup_steps_for(total, config.warmup_steps, config.warmup_ratio)
    numbers, data = config.sections.precision, config.sections.data
    replay = replay_loss_for(data.replay_loss)
    if config.objective == "sft":
        module: nn.Module = CausalLMLoss(model, numbers.loss_chunk_size, numbers.share_prefix, replay)
    else:
        reference = reference_for(model) if config.objective == "dpo" else None
        module = PreferenceLoss(model, config.objective, config.beta, config.preference_loss,
                                config.orpo_lambda, reference, numbers.loss_chunk_size, numbers.share_prefix)
    preference = module if isinstance(module, PreferenceLoss) else None
    # wrapped before the optimizer is made: FSDP replaces the parameters by their shards
    module = wrap(module) if wrap else module
    optimizer = make_optimizer(model, config)

    state, resumed_from = TrainState(), None
    if config.resume:
        if is_main_process():
            remove_stale_temporaries(run_dir / "checkpoints")  # a save interrupted by the kill
        resumed_from = latest_checkpoint(run_dir / "checkpoints")
        if resumed_from is not None:
            state = load_checkpoint(resumed_from, model, optimizer, module)
    # one global batch of batch_size examples per process; each process takes its share of it
    stream = BatchStream([len(e.input_ids) for e in train_set], config.batch_size * world_size(), config.seed,
                         config.group_by_length, state.epoch, state.batch_in_epoch, min_size=world_size())
    hooks = [*(default_hooks(config, save_weights) if hooks is None else hooks), *extra_hooks]
    hooks = [h for h in hooks if is_main_process() or not h.main_process_only]
    run = TrainingRun(config, model, optimizer, state, total, run_dir, val_set, pad_id, resumed_from,
                      last_checkpoint=resumed_from, module=module, preference=preference)
    pick = examples_for_this_process or share_of_batch

    model.train()
    for hook in hooks:
        hook.on_start(run)
    try:
        while state.step < total:
            started = time.perf_counter()
            lr = learning_rate(state.step, total, config.lr, warmup, config.schedule, config.min_lr_ratio)
            micro = [collate_batch([train_set[i] for i in pick(stream.next())], pad_id, device)
                     for _ in range(config.grad_accum)]
            try:
                loss, grad_norm, n_tokens, n_supervised = train_step(module, optimizer, micro, lr, config)
            except NonFiniteLossError as error:
                kept = (f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint
                        else "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"step {state.step + 1}: {error}; training stopped and {kept}. "
                    f"Try a lower lr (now {config.lr:g}), max_grad_norm, or precision fp32.") from None
            seconds = time.perf_counter() - started
            state.step += 1
            state.epoch, state.batch_in_epoch = stream.epoch, stream.batch_in_epoch
            state.tokens += n_tokens
            state.supervised_tokens += n_supervised
            state.elapsed += seconds
            record = StepRecord(state.step, loss, lr, grad_norm, n_tokens, n_supervised, seconds,
                                extra=preference.metrics() if preference is not None else {})
            for hook in hooks:
                hook.on_step(run, record)
    finally:
        for hook in hooks:
            hook.on_end(run)
    return FitResult(state=state, final_val_loss=run.final_val_loss, total_steps=total,
                     resumed_from=resumed_from, module=module)


__all__ = ["BatchStream", "FitResult", "NonFiniteLossError", "clip_gradients", "fit", "make_optimizer",
           "total_steps_for", "train_step"]
