"""PEFT-format adapter files: round trips per architecture and every kind of bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lora_cases import CASES, build, logits, make_input, randomise_trainable
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import tailor
from tailor.adapters import AdapterFormatError, AdapterShapeError, load_adapter, save_adapter
from tailor.adapters import format as adapter_format
from tailor.lora import LoraConfig, LoraTargetError, add_lora, lora_configs, lora_layers


def saved(tmp_path, case_name="llama-qv", seed=7):
    case = CASES[case_name]
    model = add_lora(build(case), LoraConfig(**case.config))
    randomise_trainable(model, seed)
    path = save_adapter(model, tmp_path / "adapter")
    return model, path


@pytest.mark.parametrize("case_name", ["llama-qv", "qwen2-all-linear", "gpt2-conv1d", "bert-classifier",
                                       "llama-embedding", "llama-patterns"])
def test_round_trip_gives_same_logits(case_name, tmp_path):
    x = make_input()
    model, path = saved(tmp_path, case_name)
    fresh = build(CASES[case_name])
    assert load_adapter(fresh, path, name="mine") == "mine"
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert lora_configs(fresh)["mine"] == lora_configs(model)["default"]


def test_public_api_is_importable_from_tailor():
    from tailor import adapters, lora
    from tailor._version import __version__

    for home, names in ((lora, ("LoraConfig", "add_lora", "merge_lora", "unmerge_lora", "unload_lora",
                                "trainable_parameters")), (adapters, ("save_adapter", "load_adapter"))):
        for name in names:
            assert getattr(tailor, name) is getattr(home, name), name  # the same object, not a copy
    assert tailor.__version__ == __version__


def test_saving_again_replaces_the_adapter_atomically(tmp_path):
    model, path = saved(tmp_path)
    (path / "README.md").write_text("card")
    randomise_trainable(model, seed=99)
    save_adapter(model, path)
    fresh = build(CASES["llama-qv"])
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh, make_input()), logits(model, make_input()))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_saving_into_a_shared_directory_keeps_other_files(tmp_path):
    model = add_lora(build(CASES["llama-qv"]), LoraConfig(**CASES["llama-qv"].config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    save_adapter(model, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "tailor_metadata.json"]


def test_crash_during_save_leaves_no_half_written_adapter(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    old_weights = (path / "adapter_model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_format, "save_file", crash)
    randomise_trainable(model, seed=3)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new")
    assert (path / "adapter_model.safetensors").read_bytes() == old_weights  # old adapter intact
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # temp dir cleaned up
    (path / "metrics.jsonl").write_text("{}\n")  # a shared directory: files are replaced one by one
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == old_weights
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "metrics.jsonl", "tailor_metadata.json"]


def _mismatched_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_shape_mismatch_names_module_and_shapes_and_leaves_model_untouched(tmp_path):
    _, path = saved(tmp_path)
    other = _mismatched_llama()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterShapeError) as info:
        load_adapter(other, path)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "(64, 4)" in message and "(32, 4)" in message
    assert not lora_layers(other) and not lora_configs(other)
    after = other.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _corrupt_weights(path):
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _truncate_weights(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _set_config(**changes):
    def mutate(path):
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
    return mutate


def _drop_key(path):
    weights = load_file(path / "adapter_model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, path / "adapter_model.safetensors", metadata={"format": "pt"})


def _to_pickle(path):
    weights = load_file(path / "adapter_model.safetensors")
    torch.save(weights, path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")


BAD_INPUTS = {
    "no directory": (lambda p: os.rename(p, p.with_name("gone")), AdapterFormatError, "does not exist"),
    "no config": (lambda p: os.remove(p / "adapter_config.json"), AdapterFormatError, "adapter_config.json"),
    "no weights": (lambda p: os.remove(p / "adapter_model.safetensors"), AdapterFormatError,
                   "weights are missing"),
    "config not json": (lambda p: (p / "adapter_config.json").write_text("{r: 4"), AdapterFormatError,
                        "not valid JSON"),
    "corrupt safetensors": (_corrupt_weights, AdapterFormatError, "corrupt"),
    "truncated safetensors": (_truncate_weights, AdapterFormatError, "corrupt"),
    "unknown peft_type": (_set_config(peft_type="IA3"), AdapterFormatError, "peft_type is 'IA3'"),
    "DoRA config without magnitudes": (_set_config(use_dora=True), AdapterShapeError,
                                       "lora_magnitude_vector"),
    "bad rank": (_set_config(r=-2), AdapterFormatError, "r=-2"),
    "missing tensor": (_drop_key, AdapterShapeError, "missing from the file"),
    "targets absent from model": (_set_config(target_modules=["w_q"]), LoraTargetError, "w_q"),
    "pickle refused": (_to_pickle, AdapterFormatError, "allow_pickle=True"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_adapter_inputs_raise_clear_errors_and_change_nothing(case, tmp_path):
    mutate, error, message = BAD_INPUTS[case]
    _, path = saved(tmp_path)
    mutate(path)
    model = build(CASES["llama-qv"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        load_adapter(model, path)
    assert not lora_layers(model) and not lora_configs(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_pickled_weights_load_only_when_allowed(tmp_path):
    trained, path = saved(tmp_path)
    _to_pickle(path)
    model = build(CASES["llama-qv"])
    load_adapter(model, path, allow_pickle=True)
    assert torch.equal(logits(model, make_input()), logits(trained, make_input()))


def test_loading_twice_under_one_name_is_refused(tmp_path):
    _, path = saved(tmp_path)
    model = build(CASES["llama-qv"])
    load_adapter(model, path)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_adapter(model, path)
    assert load_adapter(model, path, name="second") == "second"
