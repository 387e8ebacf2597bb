"""The training loop on tiny models: accumulation, clipping, non-finite loss, resume from a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_state, synthetic_examples, tiny_llama
from safetensors.torch import load_file

from tailor.loss import collate_batch, supervised_loss
from tailor.train import NonFiniteLossError, TrainConfig, fit
from tailor.train.checkpoint import latest_checkpoint, list_checkpoints
from tailor.train.loop import clip_gradients, make_optimizer, total_steps_for

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(method="full", data="synthetic", precision="fp32", batch_size=4, max_steps=4, lr=1e-3,
                  max_grad_norm=None, progress=False, keep_best=False, out=str(tmp_path), seed=0)
    values.update(overrides)
    return TrainConfig(**values).validate()


def run(tmp_path: Path, model=None, examples=None, **overrides):
    model = model or tiny_llama()
    config = config_for(tmp_path, **overrides)
    val = synthetic_examples(8, seed=1)
    result = fit(model, examples or synthetic_examples(), val, config, tmp_path, PAD, save_state)
    return model, result


def test_loss_goes_down(tmp_path):
    _, result = run(tmp_path, max_steps=30, lr=3e-3, batch_size=8)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed"} <= set(lines[0])
    assert lines[-1]["val_loss"] == pytest.approx(result.final_val_loss, abs=1e-5)
    assert lines[-1]["tokens"] == result.state.tokens > 0


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    """accum 2 x batch 2 == batch 4: the loss is normalised by the tokens of the whole window."""
    common = dict(max_steps=3, group_by_length=False, lr=1e-2)
    small, _ = run(tmp_path / "a", batch_size=2, grad_accum=2, **common)
    big, _ = run(tmp_path / "b", batch_size=4, grad_accum=1, **common)
    untouched = tiny_llama()
    pairs = zip(small.named_parameters(), big.parameters(), untouched.parameters(), strict=True)
    for (name, a), b, c in pairs:
        # Adam divides by sqrt(v): float noise in near-zero gradients shows up as ~1e-5 of a 1e-2 update
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=name)
        assert (a - c).abs().max() > 5e-3  # it did train, by far more than the tolerance


def test_clipping_bounds_the_global_norm(tmp_path):
    model = tiny_llama()
    batch = collate_batch(synthetic_examples()[:4], PAD, torch.device("cpu"))
    loss_sum, n = supervised_loss(model, batch)
    (loss_sum / n).backward()
    before = clip_gradients(model, 0.01)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 0.01
    assert float(after) == pytest.approx(0.01, rel=1e-4)


def test_clipping_recorded_in_metrics(tmp_path):
    run(tmp_path, max_grad_norm=0.5, max_steps=2)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["grad_norm"] > 0 for x in lines)


def test_optimizer_only_sees_trainable_params_and_skips_decay_on_vectors(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1" in name)
    optimizer = make_optimizer(model, config_for(tmp_path, weight_decay=0.1))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    decays = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in optimizer.param_groups}
    assert decays == {0.1: {2}, 0.0: {1}}


def test_epochs_decide_steps_when_max_steps_absent(tmp_path):
    config = config_for(tmp_path, max_steps=None, epochs=2.0, batch_size=5, grad_accum=2)
    assert total_steps_for(config, 24) == 5  # ceil(24/5)=5 batches per epoch, 10 batches / 2


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run(tmp_path, lr=1e30, max_steps=20, save_every=1, keep_checkpoints=50)
    message = str(info.value)
    assert "is not finite" in message and "step " in message and "checkpoint" in message
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert checkpoints, "the good steps before the blow-up were checkpointed"
    failed_step = int(message.split("step ")[1].split(":")[0])
    assert int(checkpoints[-1].name.split("-")[1]) == failed_step - 1  # nothing saved after the failure
    assert str(checkpoints[-1]) in message


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    """Resuming from a mid-run checkpoint (same config) ends with the same weights as one go."""
    common = dict(max_steps=6, save_every=3, keep_checkpoints=5, lora_dropout=0.0, lr=5e-3)
    full_model, _ = run(tmp_path / "once", **common)
    saved = [p.name for p in list_checkpoints(tmp_path / "once" / "checkpoints")]
    assert saved == ["step-000003", "step-000006"]

    second = tmp_path / "resumed"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "once" / "checkpoints" / "step-000003", second / "checkpoints" / "step-000003")
    lines = (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()
    (second / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # includes steps 4..6: must be dropped
    # another init on purpose: the checkpoint must overwrite every trainable weight
    resumed_model, result = run(second, model=tiny_llama(seed=5), resume=True, **common)
    assert result.resumed_from.name == "step-000003"
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    steps = [json.loads(x)["step"] for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(second / "checkpoints").name == "step-000006"
    saved = load_file(str(latest_checkpoint(second / "checkpoints") / "trainable.safetensors"))
    torch.testing.assert_close(saved["model.norm.weight"], resumed_model.model.norm.weight.detach())


def test_keep_best_saves_lowest_validation_loss(tmp_path):
    _, result = run(tmp_path, max_steps=6, eval_every=2, keep_best=True, lr=3e-3)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = {x["step"]: x["val_loss"] for x in lines if "val_loss" in x}
    assert sorted(vals) == [2, 4, 6]
    assert result.state.best_step == min(vals, key=vals.get)
    assert (tmp_path / "best" / "w.safetensors").exists()


def test_bf16_lora_style_training_keeps_fp32_trainables(tmp_path):
    """bf16 precision: frozen weights bf16, trainable ones fp32 and updated (what LoRA runs do)."""
    model = tiny_llama().to(torch.bfloat16)
    head = model.model.layers[0].mlp.down_proj
    head.weight.data = head.weight.data.float()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "model.layers.0.mlp.down_proj.weight")
    before = head.weight.detach().clone()
    run(tmp_path, model=model, precision="bf16", max_steps=3)
    assert head.weight.dtype == torch.float32 and not torch.equal(before, head.weight)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, _ = run(tmp_path / "a", max_steps=2)
    from tailor.methods.base import enable_activation_checkpointing

    model = tiny_llama()
    enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    checkpointed, _ = run(tmp_path / "b", model=model, max_steps=2)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=name)
