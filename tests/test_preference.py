"""Preference tuning: DPO's loss equals TRL's DPOTrainer on the same batch (TRL as the reference; its
"re-train an existing adapter" setup is tailor's init_adapter: the starting adapter is the reference),
ORPO's equals a hand computation of its formula, the data formats and the built-in pairs, and real runs:
DPO starts at ln 2 (the policy is its reference), logs its figures, and trains on from an SFT adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model_dir, write_arithmetic_jsonl

from tailor.config import ConfigError
from tailor.data import DataError
from tailor.data.preferences import builtin_preferences, load_preferences
from tailor.loss.preference import REFERENCE_ADAPTER, PreferenceLoss, orpo_losses, sequence_logps
from tailor.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [{"prompt": f"add {i % 10} {(i * 7) % 10}", "chosen": str(i % 10 + (i * 7) % 10),
          "rejected": str((i % 10 + (i * 7) % 10 + 3) % 19)} for i in range(40)]


def write_pairs(path, rows=PAIRS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trls_on_the_same_batch(tmp_path, loss_type):
    pytest.importorskip("trl", reason="TRL is the reference (pip install trl)")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tailor.adapters import load_adapter
    from tailor.lora import set_active_adapters

    directory = tiny_model_dir(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), lora)
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS[:4]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss_type], report_to=[],
                     use_cpu=True, per_device_train_batch_size=4)
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    # TRL keeps the starting adapter as "ref"; move the trained one away from it, as training would
    peft_model.save_pretrained(tmp_path / "start", selected_adapters=["default"])
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".default." in name and "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(tmp_path / "trained", selected_adapters=["default"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    peft_model.eval()
    with torch.no_grad():
        expected = float(trainer.compute_loss(peft_model, batch))

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    load_adapter(model, tmp_path / "trained")
    load_adapter(model, tmp_path / "start", name=REFERENCE_ADAPTER)
    set_active_adapters(model, "default")
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    module = PreferenceLoss(model, "dpo", beta=0.2, loss=loss_type, reference="adapter")
    with torch.no_grad():
        loss_sum, pairs = module(ours)
    assert int(pairs) == 4
    assert float(loss_sum) / 4 == pytest.approx(expected, abs=1e-5)
    assert abs(expected - math.log(2)) > 1e-3  # the policy really differs from its reference
    figures, trl_figures = module.metrics(), trainer._metrics["eval"]
    assert figures["reward_margin"] == pytest.approx(trl_figures["rewards/margins"][-1], abs=1e-5)
    assert figures["chosen_logps"] == pytest.approx(trl_figures["logps/chosen"][-1], abs=1e-4)


def test_sequence_logps_and_orpo_by_hand():
    from conftest import tiny_llama

    model = tiny_llama(seed=1).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 60, (4, 9))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[3, 7:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch, chunk_size=3)
        logits = model(input_ids=ids).logits.float().log_softmax(-1)
    for row in range(4):
        expected = sum(float(logits[row, t - 1, ids[row, t]]) for t in range(9) if labels[row, t] != -100)
        assert float(logps[row]) == pytest.approx(expected, abs=1e-5)
    assert counts.tolist() == [4, 4, 4, 2]
    # ORPO: -mean log p(c) - lambda * log sigmoid(log odds(c) - log odds(r)), odds = p / (1 - p)
    pc, pr, nc, nr, lam = -2.0, -3.0, 4, 2, 0.25
    mc, mr = pc / nc, pr / nr
    odds = (mc - math.log1p(-math.exp(mc))) - (mr - math.log1p(-math.exp(mr)))
    expected = -mc - lam * math.log(1 / (1 + math.exp(-odds)))
    got = orpo_losses(torch.tensor([pc]), torch.tensor([pr]), torch.tensor([nc]), torch.tensor([nr]), lam)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_preference_formats_and_errors(tmp_path):
    plain = load_preferences(write_pairs(tmp_path / "p.jsonl", PAIRS[:2]))
    assert plain[0].prompt == [{"role": "user", "content": "add 0 0"}] and plain[0].chosen == "0"
    chat = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    loaded = load_preferences(write_pairs(tmp_path / "c.jsonl", chat))
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in loaded] == [("q", "a", "b")] * 2
    bad = [PAIRS[0], {"prompt": "x", "chosen": "y"}, {"prompt": "x", "chosen": "", "rejected": "z"},
           {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError) as error:
        load_preferences(write_pairs(tmp_path / "bad.jsonl", bad))
    text = str(error.value)
    assert "bad.jsonl:2: field 'rejected': is missing rejected." in text
    assert "bad.jsonl:3: field 'chosen': must be a non-empty answer" in text
    assert "bad.jsonl:4: field 'rejected': chosen and rejected must be the same conversation" in text


def test_the_builtin_pairs_are_fixed_and_wrong_in_three_ways():
    pairs = builtin_preferences("builtin:support-prefs:test")
    assert len(pairs) == 200 and pairs == builtin_preferences("builtin:support-prefs:test")
    kinds = []
    for pair in pairs[:30]:
        right = json.loads(pair.chosen)
        try:
            wrong = json.loads(pair.rejected)
        except ValueError:
            kinds.append("invalid")
            continue
        changed = [k for k in right if right[k] != wrong[k]]
        assert len(changed) == 1
        kinds.append(changed[0])
    assert kinds[:3] == ["intent", "order_id", "invalid"] and set(kinds) == {"intent", "order_id", "invalid"}
    with pytest.raises(DataError, match="unknown built-in preference set"):
        builtin_preferences("builtin:support-prefs:dev")


def test_dpo_and_orpo_train_and_log_their_figures(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = write_pairs(tmp_path / "p.jsonl")
    sft_data = write_arithmetic_jsonl(tmp_path / "sft.jsonl")
    sft = train(TrainConfig(model=str(model), data=str(sft_data), rank=4, precision="fp32", max_steps=2,
                            batch_size=4, progress=False, out=str(tmp_path / "sft"), lr=1e-2))
    for name, extra in (("dpo", {}), ("dpo-sft", {"init_adapter": str(sft / "adapter")}), ("orpo", {})):
        method = name.split("-")[0]
        run = train(TrainConfig(model=str(model), data=str(data), method=method, rank=4, precision="fp32",
                                max_steps=3, batch_size=4, eval_every=3, progress=False,
                                out=str(tmp_path / name), lr=1e-2, **extra))
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert {"reward_margin", "preference_accuracy", "chosen_logps", "rejected_logps"} <= set(lines[0])
        assert "val_preference_accuracy" in lines[-1]
        config = (run / "config.yaml").read_text()
        assert f"objective: {method}" in config and "method: lora" in config
        if method == "dpo":  # the policy starts as its reference: the loss is ln 2 exactly
            assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        # the adapter is described for routing (model "auto") from its pairs' prompts, as an SFT one is
        routing = json.loads((run / "adapter" / "tailor_metadata.json").read_text())["routing"]
        assert routing["prompts"] > 0 and routing["centroids"]
    from safetensors.torch import load_file

    delivered = load_file(tmp_path / "dpo-sft" / "adapter" / "adapter_model.safetensors")
    started = load_file(sft / "adapter" / "adapter_model.safetensors")
    assert set(delivered) == set(started)  # the trained adapter alone, no reference copy


def test_bad_preference_configs_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match="objective: 'kto' is not one of sft, dpo, orpo"):
        TrainConfig(data="p.jsonl", objective="kto").validate()
    with pytest.raises(ConfigError, match="replay_ratio: replay mixes answers"):
        TrainConfig(data="p.jsonl", method="dpo", replay_ratio=0.2).validate()
    with pytest.raises(ConfigError, match="init_adapter: method full trains no adapter"):
        TrainConfig(data="p.jsonl", method="full", init_adapter="a").validate()
    with pytest.raises(ConfigError, match="beta: 0.0 must be > 0"):
        TrainConfig(data="p.jsonl", method="dpo", beta=0.0).validate()


def test_compare_names_preference_entries():
    from tailor.compare.entries import parse_entries

    base = {"data": "builtin:support", "rank": 16, "lora_alpha": 32, "replay_ratio": 0.4, "replay_loss": "kl"}
    sft, then, alone = parse_entries("lora-r16,lora-r16+dpo,orpo-r8", base)
    assert then.overrides == {"method": "lora", "objective": "dpo", "data": "builtin:support-prefs",
                              "replay_ratio": 0.0, "replay_loss": "ce", "init_adapter_from": "lora-r16",
                              "rank": 16, "lora_alpha": 32.0}
    assert [alone.overrides[k] for k in ("objective", "rank", "lora_alpha")] == ["orpo", 8, 16]
    runnable = {k: v for k, v in then.overrides.items() if k != "init_adapter_from"}
    TrainConfig(**{**base, **runnable}).validate()
    with pytest.raises(ValueError, match="name lora-r16 before it"):
        parse_entries("lora-r16+dpo,lora-r16", base)
    with pytest.raises(ValueError, match="only builtin:support has one"):
        parse_entries("dpo", {"data": "mine.jsonl"})


def test_the_plan_counts_both_answers_and_a_full_fine_tunes_frozen_copy():
    from tailor.plan.memory import estimate_memory
    from tailor.plan.planner import planned_peak_gib, resolve_model, train_config_setup

    sft, dpo = TrainConfig(data="p.jsonl", method="lora"), TrainConfig(data="p.jsonl", method="dpo")
    assert train_config_setup(dpo, "cpu").batch_size == 2 * train_config_setup(sft, "cpu").batch_size
    full, full_dpo = TrainConfig(data="p.jsonl", method="full"), TrainConfig(data="p.jsonl", method="full",
                                                                           objective="dpo", batch_size=4)
    arch = resolve_model(full.model)
    weights = estimate_memory(arch, train_config_setup(full_dpo, "cpu"), "cpu")
    expected = (weights.total + weights.frozen_weights + weights.adapter_weights) / 2**30
    assert planned_peak_gib(full_dpo, "cpu") == pytest.approx(expected)
