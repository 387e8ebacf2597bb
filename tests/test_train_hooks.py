"""Hooks around the training step: progress lines when stdout is not a terminal, rank-0-only writers,
and observers (what the benchmark uses) that see every step."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import save_state, synthetic_examples, tiny_llama, tiny_model_dir, write_arithmetic_jsonl
from typer.testing import CliRunner

from tailor.cli import app
from tailor.train import TrainConfig, fit
from tailor.train.hooks import EvaluationHook, Hook, MetricsHook, ProgressHook

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0


def config_for(tmp_path, **overrides) -> TrainConfig:
    values = dict(method="full", data="synthetic", precision="fp32", batch_size=4, lr=1e-3,
                  max_grad_norm=None, progress=False, keep_best=False, out=str(tmp_path), seed=0)
    return TrainConfig(**{**values, **overrides}).validate()

LINE = re.compile(r"^step (\d+)/(\d+)  loss \d+\.\d{4}  lr \S+  [\d,]+ tok/s(  val \d+\.\d{4})?  "
                  r"elapsed \d+m\d\ds  eta \d+m\d\ds$")


class Recorder(Hook):
    def __init__(self) -> None:
        self.records = []

    def on_step(self, run, record) -> None:
        self.records.append(record)


def test_plain_progress_line_when_not_a_terminal(tmp_path):
    stream = io.StringIO()  # not a tty: no bar, plain lines
    config = config_for(tmp_path, max_steps=5, eval_every=2)
    hooks = [EvaluationHook(), MetricsHook(), ProgressHook(stream=stream, interval=30.0)]
    fit(tiny_llama(), synthetic_examples(), synthetic_examples(8, seed=1), config, tmp_path, PAD, save_state,
        hooks=hooks)
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    # the first step at once, then (within 30 s) only evaluations and the last step
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 2, 4, 5]
    assert all(LINE.match(line).group(2) == "5" for line in lines)
    assert "val" in lines[1] and "val" in lines[-1]


def test_progress_interval_bounds_the_silence(tmp_path):
    stream = io.StringIO()
    config = config_for(tmp_path, max_steps=4)
    fit(tiny_llama(), synthetic_examples(), [], config, tmp_path, PAD, save_state,
        hooks=[ProgressHook(stream=stream, interval=0.0)])
    assert [int(LINE.match(x).group(1)) for x in stream.getvalue().splitlines()] == [1, 2, 3, 4]


def test_redirected_tailor_train_prints_progress(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=16)
    result = CliRunner().invoke(app, ["train", "--model", str(model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4",
                                      "--num-threads", "1"])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps and LINE.match(steps[0]) and steps[0].startswith("step 1/3")
    assert steps[-1].startswith("step 3/3")


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    import tailor.train.checkpoint as checkpoint
    import tailor.train.hooks as hooks
    import tailor.train.loop as loop

    for module in (loop, hooks, checkpoint):  # where the loop, the hooks and checkpoints ask
        monkeypatch.setattr(module, "is_main_process", lambda: False)
    model, before = tiny_llama(), tiny_llama()
    recorder = Recorder()
    config = config_for(tmp_path / "run", max_steps=3, save_every=1, keep_best=True, eval_every=1)
    result = fit(model, synthetic_examples(), synthetic_examples(8, seed=1), config, tmp_path / "run", PAD,
                 save_state, extra_hooks=[recorder])
    assert result.state.step == 3 and len(recorder.records) == 3  # it trained and evaluated ...
    assert all(r.val_loss is not None for r in recorder.records)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # ... and wrote nothing
    changed = [(a - b).abs().max() for a, b in zip(model.parameters(), before.parameters(), strict=True)]
    assert max(changed) > 1e-4


def test_observer_hook_sees_every_step_as_logged(tmp_path):
    recorder = Recorder()
    config = config_for(tmp_path, max_steps=4)
    fit(tiny_llama(), synthetic_examples(), [], config, tmp_path, PAD, save_state, extra_hooks=[recorder])
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.step for r in recorder.records] == [x["step"] for x in logged] == [1, 2, 3, 4]
    for record, line in zip(recorder.records, logged, strict=True):
        assert round(record.loss, 6) == line["loss"] and record.lr == line["lr"]
    assert sum(r.tokens for r in recorder.records) == logged[-1]["tokens"]
    assert all(isinstance(r.seconds, float) and r.seconds > 0 for r in recorder.records)
