"""precision: auto, resolved by the device (tailor.hardware): the rule, its agreement with a timed matmul on
this machine, and a training run where config.yaml, report.md, summary.json and the trainer agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_dir, write_arithmetic_jsonl

from tailor import hardware
from tailor.train import load_config, train
from tailor.train.hooks import Hook


def test_config_defaults_to_auto():
    assert load_config(data="builtin:support").precision == "auto"


@pytest.mark.parametrize(("native", "resolved"), [(False, "fp32"), (True, "bf16")])
def test_auto_follows_native_bf16(monkeypatch, native, resolved):
    monkeypatch.setattr(hardware, "native_bf16", lambda device=None: native)
    precision = hardware.resolve_precision("auto", "cpu")
    assert (precision.resolved, precision.native_bf16, precision.requested) == (resolved, native, "auto")
    assert precision.reason.startswith(f"auto -> {resolved}: cpu ({hardware.cpu_capability()}): ")
    assert ("no native bf16" in precision.reason) is not native
    assert hardware.fast_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    for explicit in ("bf16", "fp32"):  # an explicit choice is kept
        assert hardware.precision_for(explicit, "cpu") == explicit


def test_explicit_bf16_without_native_warns_with_the_fix(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device=None: False)
    with pytest.warns(UserWarning, match=r"no native bf16: its matmuls run .*slower.*--precision auto"):
        assert hardware.resolve_precision("bf16", "cpu").resolved == "bf16"


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        hardware.resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="precision: 'fp8' is not one of auto, bf16, fp32"):
        load_config(data="builtin:support", precision="fp8")


class _Dtypes(Hook):
    """What the trainer computes in: a frozen weight's dtype and whether autocast is on in the forward."""

    def __init__(self) -> None:
        self.frozen: set[torch.dtype] = set()
        self.linear: set[torch.dtype] = set()
        self.autocast: set[bool] = set()

    def on_start(self, run) -> None:
        self.frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
        self.linear = {m.weight.dtype for m in run.model.modules()
                       if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad}
        layer = next(m for m in run.model.modules() if type(m).__name__.endswith("DecoderLayer"))
        layer.register_forward_pre_hook(lambda _m, _a: self.autocast.add(torch.is_autocast_enabled("cpu")))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("native", "resolved"), [(False, "fp32"), (True, "bf16")])
def test_train_records_and_runs_the_resolved_precision(tiny_dir, tmp_path, monkeypatch, capsys, native,
                                                       resolved):
    monkeypatch.setattr(hardware, "native_bf16", lambda device=None: native)
    out = tmp_path / "run"
    config = load_config(model=str(tiny_dir), data=str(write_arithmetic_jsonl(tmp_path / "train.jsonl")),
                         out=str(out), max_steps=2, batch_size=8, rank=4, progress=False, num_threads=1)
    assert config.precision == "auto"
    dtypes = _Dtypes()
    train(config, extra_hooks=[dtypes])

    reason = hardware.resolve_precision("auto", "cpu").reason
    assert f"precision: {reason}" in capsys.readouterr().out  # printed once, at the start
    text = (out / "config.yaml").read_text()
    assert text.startswith(f"# precision: {reason}\n")
    assert yaml.safe_load(text)["precision"] == resolved
    assert load_config(out / "config.yaml").precision == resolved  # the run reloads as it ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == {"requested": "auto", "resolved": resolved, "reason": reason,
                                    "device": "cpu", "cpu_capability": hardware.cpu_capability(),
                                    "native_bf16": native}
    assert f"| precision | `{resolved}` ({reason}) |" in (out / "report.md").read_text()
    # bf16 stores the whole base in bf16; fp32 stores it as auto's base_dtype says there
    # (tailor.names.BASE_DTYPE_AT_FP32): bf16 linear and embedding weights upcast per matmul with fp32
    # norms (tailor.models.upcast), or all fp32
    from tailor.names import BASE_DTYPE_AT_FP32

    stored = "bf16" if native else BASE_DTYPE_AT_FP32
    upcast = {torch.bfloat16, torch.float32}
    assert dtypes.frozen == ({torch.bfloat16} if native else upcast if stored == "bf16" else {torch.float32})
    assert dtypes.linear == {torch.bfloat16 if stored == "bf16" else torch.float32}
    assert dtypes.autocast == {native}
    assert summary["base_dtype"]["requested"] == "auto" and summary["base_dtype"]["resolved"] == stored
    assert f"# base_dtype: auto -> {stored}" in text


@pytest.mark.parametrize("native", [False, True])
def test_the_demo_says_which_recipe_it_runs_and_why(monkeypatch, native):
    from tailor.train.demo import DEMO_RECIPE, FP32_CPU_EVAL_N, FP32_CPU_RECIPE, demo_recipe

    monkeypatch.setattr(hardware, "native_bf16", lambda device=None: native)
    recipe, eval_n, why = demo_recipe("cpu")
    if native:
        assert (recipe, eval_n, why) == (DEMO_RECIPE, None, None)
    else:
        assert recipe == {**DEMO_RECIPE, **FP32_CPU_RECIPE} and recipe["precision"] == "auto"
        assert eval_n == FP32_CPU_EVAL_N and why.startswith("auto -> fp32: cpu (")


def test_the_demo_fits_its_steps_to_the_step_time_it_measures(tmp_path):
    """Without native bf16 the demo times real training steps at start-up and sizes the run to its budget:
    the probe agrees with the steps of a real run, and the step count follows from it by the budget."""
    import statistics

    from tailor.train.demo import (
        FIXED_COST_STEPS,
        MIN_FITTED_STEPS,
        MIXED_STEP_RATIO,
        seconds_per_step,
        steps_within_budget,
    )

    config = load_config(model=str(tiny_model_dir(tmp_path / "model")), out=str(tmp_path / "run"),
                         data=str(write_arithmetic_jsonl(tmp_path / "data.jsonl")), batch_size=4, max_steps=8,
                         precision="fp32", save_every=0, eval_every=0, progress=False)
    probe = seconds_per_step(config)
    assert not (tmp_path / "run").exists()  # the probe writes nothing where the run goes

    class StepTimes(Hook):
        seconds: list[float] = []

        def on_step(self, run, record):
            self.seconds.append(record.seconds)

    train(config, extra_hooks=[StepTimes()])
    real = statistics.median(StepTimes.seconds[1:])
    assert real / 3 < probe < real * 3

    n = 300  # a step time that leaves exactly n steps in a 900 s budget
    step = 900 / (FIXED_COST_STEPS + MIXED_STEP_RATIO * n)
    assert steps_within_budget(step * 0.999, 400, 900) == n
    assert steps_within_budget(step / 2, 400, 900) == 400  # a fast machine runs the recipe's steps, no more
    assert steps_within_budget(900.0, 400, 900) == MIN_FITTED_STEPS  # a very slow one still learns something
