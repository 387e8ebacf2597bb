"""Hooks: what happens around a training step besides the step itself.

`fit` calls, in list order, `on_start(run)` once, `on_step(run, record)` after every optimizer step, and
`on_end(run)` once (also when training stops on an error). Hooks that write files or print declare
`main_process_only = True` and run only in the process of rank 0; KeepBestHook and CheckpointHook run in
every process, because under FSDP the weights are gathered from all of them (a collective) before rank 0
alone writes them. The default set, in order:
EvaluationHook (validation loss; records the best), KeepBestHook (best/ weights), MetricsHook
(metrics.jsonl), ProgressHook (a bar on a terminal, a plain line every 30 s otherwise), CheckpointHook.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from torch import nn

from tailor.files import atomic_write_text
from tailor.loss import validation_loss
from tailor.train.checkpoint import save_checkpoint
from tailor.train.distributed import full_parameters, is_main_process, uses_fsdp

if TYPE_CHECKING:
    from tailor.config import TrainConfig
    from tailor.train.checkpoint import TrainState


@dataclass
class StepRecord:
    """One optimizer step, as hooks see it. `val_loss` is set by EvaluationHook on evaluation steps."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int  # real (non-pad) tokens in this step, all processes
    supervised_tokens: int
    seconds: float
    val_loss: float | None = None
    improved: bool = False  # val_loss is the best seen so far
    extra: dict[str, float] = field(default_factory=dict)  # the objective's own figures (reward margin ...)


@dataclass
class TrainingRun:
    """The state of a run that hooks read (and the few fields they own: last_checkpoint, final_val_loss)."""

    config: TrainConfig
    model: nn.Module  # the bare model being trained (not the DDP/FSDP wrapper)
    optimizer: Any
    state: TrainState
    total_steps: int
    run_dir: Path
    val_set: Any
    pad_id: int
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    final_val_loss: float | None = None
    module: nn.Module | None = None  # the training module as fit wraps it (DDP, FSDP), None: not wrapped
    preference: Any = None  # the PreferenceLoss of a dpo/orpo run (tailor.loss.preference), else None

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps


class Hook:
    main_process_only = False

    def on_start(self, run: TrainingRun) -> None:
        pass

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        pass

    def on_end(self, run: TrainingRun) -> None:
        pass


def _due(step: int, every: int | None, last: bool) -> bool:
    return last or bool(every and step % every == 0)


class EvaluationHook(Hook):
    """Validation loss every `eval_every` steps and at the end; tracks the best in the run state."""

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        if not _due(record.step, run.config.eval_every, run.finished):
            return
        config = run.config
        if run.preference is not None:  # held-out pairs: the preference loss, and the accuracy with it
            from tailor.loss.preference import preference_validation

            record.val_loss, figures = preference_validation(run.preference, run.val_set, config.batch_size,
                                                             run.pad_id, config.precision,
                                                             config.eval_batches)
            record.extra.update({f"val_{k}": v for k, v in figures.items()})
        else:
            # under FSDP only the wrapped training module gathers the sharded weights for a forward
            scored = run.module if uses_fsdp(run.module) else run.model
            record.val_loss = validation_loss(scored, run.val_set, config.batch_size, run.pad_id,
                                              config.precision, config.eval_batches, config.loss_chunk_size)
        state = run.state
        record.improved = record.val_loss is not None and (
            state.best_val_loss is None or record.val_loss < state.best_val_loss)
        if record.improved and config.keep_best:
            state.best_val_loss, state.best_step = record.val_loss, record.step
        if run.finished:
            run.final_val_loss = record.val_loss


class KeepBestHook(Hook):
    """Writes the weights of the best validation loss so far to run_dir/best (keep_best)."""

    def __init__(self, save_weights: Callable[[nn.Module, Path], Any]):
        self.save_weights = save_weights

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        if record.improved and run.config.keep_best:
            with full_parameters(run.module):
                if is_main_process():
                    self.save_weights(run.model, run.run_dir / "best")


class MetricsHook(Hook):
    """metrics.jsonl: one line every `log_every` steps, on evaluations and at the end. tokens_per_s is
    over the steps since the previous line. On resume, lines past the checkpoint's step are dropped."""

    main_process_only = True

    def __init__(self) -> None:
        self._handle: TextIO | None = None
        self._tokens, self._seconds = 0, 0.0

    def on_start(self, run: TrainingRun) -> None:
        path = run.run_dir / "metrics.jsonl"
        kept = []
        if run.resumed_from is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= run.state.step:
                        kept.append(line)
                except ValueError:  # a line cut short by the kill: the checkpoint's steps come before it
                    break
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._handle = path.open("a")

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        self._tokens += record.tokens
        self._seconds += record.seconds
        if not (_due(record.step, run.config.log_every, run.finished) or record.val_loss is not None):
            return
        line: dict[str, Any] = {
            "step": record.step, "loss": round(record.loss, 6), "lr": record.lr, "tokens": run.state.tokens,
            "tokens_per_s": round(self._tokens / self._seconds, 1) if self._seconds else 0.0,
            "elapsed": round(run.state.elapsed, 3)}
        if record.grad_norm is not None:
            line["grad_norm"] = round(record.grad_norm, 6)
        if record.val_loss is not None:
            line["val_loss"] = round(record.val_loss, 6)
        line.update({k: round(v, 6) for k, v in record.extra.items()})
        assert self._handle is not None
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()
        self._tokens, self._seconds = 0, 0.0

    def on_end(self, run: TrainingRun) -> None:
        if self._handle is not None:
            self._handle.close()


class CheckpointHook(Hook):
    """Resumable state every `save_every` steps and at the end (tailor.train.checkpoint)."""

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        if _due(record.step, run.config.save_every, run.finished):
            run.last_checkpoint = save_checkpoint(run.run_dir / "checkpoints", run.model, run.optimizer,
                                                  run.state, run.config.to_dict(),
                                                  keep=run.config.keep_checkpoints, module=run.module)


class ProgressHook(Hook):
    """A rich progress bar on a terminal; elsewhere (CI, nohup, a pipe) a plain line at the first step,
    then at least every `interval` seconds, and at the end, so a redirected run is never silent."""

    main_process_only = True

    def __init__(self, stream: TextIO | None = None, interval: float = 30.0, bar: bool | None = None):
        self.stream = stream or sys.stdout
        self.interval = interval
        self.use_bar = self.stream.isatty() if bar is None else bar
        self._bar: Any = None
        self._exit = contextlib.ExitStack()
        self._last_print = -math.inf
        self._tokens, self._seconds, self._steps = 0, 0.0, 0

    def on_start(self, run: TrainingRun) -> None:
        if not self.use_bar:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        self._bar = self._exit.enter_context(Progress(*columns, console=Console(file=self.stream)))
        self._task = self._bar.add_task("train", total=run.total_steps, completed=run.state.step, info="")

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        self._tokens += record.tokens
        self._seconds += record.seconds
        self._steps += 1
        tps = self._tokens / self._seconds if self._seconds else 0.0
        info = f"loss {record.loss:.4f}  lr {record.lr:.2e}  {tps:,.0f} tok/s"
        if record.val_loss is not None:
            info += f"  val {record.val_loss:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=record.step, info=info)
            return
        now = time.monotonic()
        if now - self._last_print < self.interval and not run.finished and record.val_loss is None:
            return
        self._last_print = now
        eta = self._seconds / self._steps * (run.total_steps - record.step)  # this process's mean step
        print(f"step {record.step}/{run.total_steps}  {info}  elapsed {_clock(run.state.elapsed)}  "
              f"eta {_clock(eta)}", file=self.stream, flush=True)

    def on_end(self, run: TrainingRun) -> None:
        self._exit.close()


class TrackerHook(Hook):
    """The run's experiment trackers (`report_to`, tailor.trackers): the resolved config at the start, the
    metrics.jsonl figures on the same steps, closed as failed when training stops on an error. A run that
    finishes is left open for `_train` to log its summary and deliverable (`finish`)."""

    main_process_only = True

    def __init__(self) -> None:
        from tailor.trackers import Trackers

        self.trackers = Trackers([], Path())

    def on_start(self, run: TrainingRun) -> None:
        from tailor.trackers import open_trackers

        config = run.config.to_dict()
        self.trackers = open_trackers(config["report_to"], run.run_dir, run.run_dir.name, config)

    def on_step(self, run: TrainingRun, record: StepRecord) -> None:
        if not (_due(record.step, run.config.log_every, run.finished) or record.val_loss is not None):
            return
        metrics = {"loss": record.loss, "lr": record.lr, "tokens": float(run.state.tokens),
                   "tokens_per_s": record.tokens / record.seconds if record.seconds else 0.0}
        if record.grad_norm is not None:
            metrics["grad_norm"] = record.grad_norm
        if record.val_loss is not None:
            metrics["val_loss"] = record.val_loss
        metrics.update(record.extra)
        self.trackers.log_metrics(metrics, record.step)

    def on_end(self, run: TrainingRun) -> None:
        if not run.finished:
            self.trackers.finish(failed=True)

    def finish(self, summary: dict[str, Any], deliverable: Path) -> None:
        """The run's summary figures and its deliverable (the adapter, or the model), then close."""
        self.trackers.log_summary(summary, prefix="summary/")
        self.trackers.log_artifact(deliverable, deliverable.name)
        self.trackers.finish()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def default_hooks(config: TrainConfig, save_weights: Callable[[nn.Module, Path], Any]) -> list[Hook]:
    hooks: list[Hook] = [EvaluationHook(), KeepBestHook(save_weights), MetricsHook()]
    if config.progress:
        hooks.append(ProgressHook())
    hooks.append(CheckpointHook())
    return hooks


__all__ = ["CheckpointHook", "EvaluationHook", "Hook", "KeepBestHook", "MetricsHook", "ProgressHook",
           "StepRecord", "TrackerHook", "TrainingRun", "default_hooks"]
