"""Several training processes (torchrun, gloo on CPU, 2 processes, tiny model): DDP and FSDP follow the
single-process trajectory, the adapter loads in PEFT, a failure on one rank ends the job naming it, and a
resume after a kill continues the same trajectory. Every run goes through the real launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir, write_arithmetic_jsonl
from safetensors.torch import load_file

from tailor.config import load_config
from tailor.train import train
from tailor.train.checkpoint import list_checkpoints

STEPS = 30


def _settings(model_dir: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--batch-size", str(batch_size), "--rank", "4", "--lora-alpha", "8", "--lr", "3e-3",
            "--save-every", "5", "--eval-every", "10", "--val-fraction", "0.2", "--no-progress",
            "--num-threads", "1"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}


def _tailor_nproc(*arguments: str, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tailor", "train", "--nproc", "2", *arguments],
                            env=_env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 4 (in this process), and 2 processes x batch 2: DDP through
    `tailor train --nproc 2`, FSDP through plain torchrun. Precision fp32 for DDP, bf16 (the default: a
    bf16 base with fp32 adapters, sharded in two dtypes) for FSDP."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir = tiny_model_dir(root / "model")
    data = write_arithmetic_jsonl(root / "train.jsonl", n=40)
    out = {name: root / name for name in ("one", "one-bf16", "ddp", "fsdp")}
    before = torch.get_num_threads()
    for name, precision in (("one", "fp32"), ("one-bf16", "bf16")):
        train(load_config(model=str(model_dir), data=str(data), out=str(out[name]), max_steps=STEPS,
                          batch_size=4, rank=4, lora_alpha=8.0, lr=3e-3, save_every=5, eval_every=10,
                          val_fraction=0.2, progress=False, num_threads=1, precision=precision,
                          share_prefix=False))  # the settings of _settings, batch 4
    torch.set_num_threads(before)
    ddp = _tailor_nproc(*_settings(model_dir, data, out["ddp"], 2), "--precision", "fp32")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "tailor", "train", *_settings(model_dir, data, out["fsdp"], 2), "--strategy", "fsdp"]
    fsdp = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=300)
    stdout, stderr = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, stderr[-3000:]
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert stdout.count("run directory:") == 1  # rank 0 alone reports
    return {"model": model_dir, "data": data, **out}


@pytest.mark.parametrize(("strategy", "reference", "tolerance"),
                         [("ddp", "one", 1e-5), ("fsdp", "one-bf16", 2e-3)])
def test_two_processes_follow_one_process_with_twice_the_batch(runs, strategy, reference, tolerance):
    ours, theirs = _metrics(runs[strategy]), _metrics(runs[reference])
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))  # rank 0 alone wrote each line once
    # the same tokens every step: together the processes read exactly the examples of one batch of 4
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance), a["step"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=tolerance), a["step"]
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.2  # it learned
    weights, reference_weights = _adapter(runs[strategy]), _adapter(runs[reference])
    assert weights.keys() == reference_weights.keys()
    for key, value in weights.items():
        assert value.dtype == reference_weights[key].dtype == torch.float32
        torch.testing.assert_close(value, reference_weights[key], rtol=0, atol=50 * tolerance, msg=key)
    summary = json.loads((runs[strategy] / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == strategy


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_adapter_from_two_processes_loads_in_peft(runs, strategy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = "one" if strategy == "ddp" else "one-bf16"
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    logits = {}
    for name in (strategy, reference):
        base = AutoModelForCausalLM.from_pretrained(runs["model"], dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, runs[name] / "adapter").eval()
        with torch.no_grad():
            logits[name] = peft_model(input_ids=ids).logits
    torch.testing.assert_close(logits[strategy], logits[reference], rtol=0, atol=0.05)
    config = json.loads((runs[strategy] / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((runs[reference] / "adapter" / "adapter_config.json").read_text())


def _rank_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    """The pid of the training process of `rank` among the launcher's children (read from /proc)."""
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.01)
    raise AssertionError(f"no process of rank {rank} appeared")


def test_killed_rank_ends_the_job_and_resume_continues_the_trajectory(runs, tmp_path):
    out = tmp_path / "killed"
    arguments = [*_settings(runs["model"], runs["data"], out, 2), "--strategy", "fsdp"]
    launcher = _tailor_nproc(*arguments)
    deadline = time.monotonic() + 120
    victim = _rank_pid(launcher, 1, deadline)
    while not list_checkpoints(out / "checkpoints"):
        assert launcher.poll() is None, "the run ended before its first checkpoint could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=60)  # the whole job ends: no process left waiting
    assert launcher.returncode == 1
    assert stderr.strip().splitlines()[-1] == ("error: training process rank 1 (of 2) was killed by SIGKILL; "
                                               "torchrun stopped the other processes.")
    assert not (out / "adapter").exists()
    stopped_at = int(list_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert stopped_at < STEPS

    resumed = _tailor_nproc(*arguments, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == list(range(1, STEPS + 1))
    uninterrupted = _metrics(runs["fsdp"])
    for a, b in zip(_metrics(out), uninterrupted, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    weights, reference = _adapter(out), _adapter(runs["fsdp"])
    for key, value in weights.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_exception_on_one_rank_ends_the_job_naming_it(runs, tmp_path):
    # a test-only sitecustomize (imported by every Python started with it on the path) makes the
    # training step of rank 1 raise at step 2: a real failure in one real process of the real launcher
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import tailor.train.loop as loop\n"
        "    step = loop.train_step\n"
        "    calls = []\n"
        "    def failing_step(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            raise RuntimeError('injected failure')\n"
        "        return step(*args, **kwargs)\n"
        "    loop.train_step = failing_step\n")
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    launcher = _tailor_nproc(*_settings(runs["model"], runs["data"], tmp_path / "run", 2), "--timeout", "60",
                             PYTHONPATH=path)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert stderr.strip().splitlines()[-1] == ("error: training process rank 1 (of 2) failed: RuntimeError: "
                                               "injected failure; torchrun stopped the other processes.")
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--strategy", "zero"], "strategy: 'zero' is not one of ddp, fsdp"),
    (["--timeout", "0"], "timeout: 0.0 must be > 0"),
    (["--method", "qlora-nf4", "--strategy", "fsdp"], "use strategy ddp"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_with_nproc_stops_before_any_process_starts(tmp_path, monkeypatch, arguments, expected):
    from typer.testing import CliRunner

    import tailor.train.launch

    def no_launch(*_args, **_kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(tailor.train.launch, "launch", no_launch)  # refused before any process starts

    from tailor.cli import app

    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=8)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--data", str(data), "--out", str(out),
                                      *arguments])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and expected in text and "Traceback" not in text
    assert not out.exists()  # nothing written


def test_kl_replay_in_two_processes_follows_one_process(tmp_path, monkeypatch):
    """replay_loss kl under DDP: each process runs the base model on the replayed rows of its own share of
    the batch, and together they take the loss and the step of one process with the whole batch."""
    from tailor.models import load_model, parse_dtype
    from tailor.train.replay import REPLAY_MAX_NEW_TOKENS, replay_cache_file

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))  # for this process and the launched ones
    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=40)
    prompts = ("Name a river.", "Say something kind.", "Count to three.", "Name a tree.")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts))
    model, _ = load_model(str(model_dir), dtype=parse_dtype("auto"))
    answers = replay_cache_file(model, prompts, REPLAY_MAX_NEW_TOKENS)
    answers.parent.mkdir(parents=True)
    answers.write_text("".join(json.dumps({"prompt": p, "answer": f"a plain answer {i} " * (i + 1),
                                           "finished": True}) + "\n" for i, p in enumerate(prompts)))
    replay = {"replay_ratio": 0.5, "replay_prompts": str(prompt_file), "replay_loss": "kl"}  # 64 examples
    ddp = _tailor_nproc(*_settings(model_dir, data, tmp_path / "ddp", 2), "--precision", "fp32",
                        *(f"--{key.replace('_', '-')}={value}" for key, value in replay.items()))
    before = torch.get_num_threads()
    train(load_config(model=str(model_dir), data=str(data), out=str(tmp_path / "one"), max_steps=STEPS,
                      batch_size=4, rank=4, lora_alpha=8.0, lr=3e-3, save_every=5, eval_every=10,
                      val_fraction=0.2, progress=False, num_threads=1, precision="fp32", share_prefix=False,
                      **replay))
    torch.set_num_threads(before)
    _, stderr = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, stderr[-3000:]
    ours, theirs = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    reference = _adapter(tmp_path / "one")
    for key, value in _adapter(tmp_path / "ddp").items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=5e-4, msg=key)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["replay"]["reused"] and summary["replay"]["kept"] == 4 and summary["processes"] == 2
