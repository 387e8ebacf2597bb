"""tailor.models: resolution of names/paths without downloading, local round trips, the GGUF cache."""

from __future__ import annotations

import json
import os
import shutil
import time

import huggingface_hub.constants
import pytest
import torch
from conftest import chat_tokenizer, tiny_chat_llama

from tailor.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    gguf_cache,
    load_model,
    load_tokenizer,
    resolve_model,
)
from tailor.models.gguf_cache import SOURCE_RECORD, GGUFConversionError, _source_record, cached_gguf_dir
from tailor.models.load import default_gguf_path


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point the HF cache at an empty folder, so nothing on this machine's real cache leaks in."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def save_tiny_model(directory, tie: bool = True, pad: bool = True):
    tokenizer = chat_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    model = tiny_chat_llama(len(tokenizer), seed=5, tie_word_embeddings=tie)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_unknown_name_says_how_to_make_it_available(empty_hf_cache):
    with pytest.raises(ModelNotFoundError) as caught:
        load_model("some-org/not-a-real-model")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "'some-org/not-a-real-model' is not available locally" in message
    assert "huggingface-cli download some-org/not-a-real-model" in message
    assert "local directory" in message and ".gguf" in message and "never downloads" in message


def test_missing_path_and_non_model_directory_are_refused(tmp_path, empty_hf_cache):
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        resolve_model("./weights/model.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no .gguf file"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        load_model(str(tmp_path / "notes.txt"))


def test_local_directory_round_trip(tmp_path):
    original, _ = save_tiny_model(tmp_path / "tiny", pad=False)
    model, tokenizer = load_model(str(tmp_path / "tiny"))
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # pad filled in from eos
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.cpu()(ids).logits, original(ids).logits)

    bf16, _ = load_model(str(tmp_path / "tiny"), dtype=torch.bfloat16, device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight is bf16.model.embed_tokens.weight


def test_repo_id_resolves_from_the_local_hf_cache_only(empty_hf_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--tiny-org--tiny-chat"
    snapshot = repo / "snapshots" / commit
    original, _ = save_tiny_model(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

    model, tokenizer = load_model("tiny-org/tiny-chat", device="cpu")
    assert model.name_or_path == "tiny-org/tiny-chat"  # portable name, not the cache path
    assert resolve_model("tiny-org/tiny-chat").directory == snapshot
    ids = torch.tensor([[1, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    with pytest.raises(ModelNotFoundError, match="not available locally"):
        load_model("tiny-org/other-chat")


def test_gguf_cache_is_reused_while_the_source_is_unchanged(tmp_path, monkeypatch):
    """A .gguf path maps to a cache directory keyed by the file; a changed file is converted again."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"not really gguf")
    target = tmp_path / "cache" / "models" / "weights-fake"
    save_tiny_model(target)
    (target / SOURCE_RECORD).write_text(json.dumps(_source_record(gguf.resolve())))

    assert cached_gguf_dir(gguf, cache_name="weights-fake") == target  # no conversion attempted
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # "a new file": conversion needed
    with pytest.raises(GGUFConversionError, match="Could not load .*weights.gguf as a causal language model"):
        cached_gguf_dir(gguf, cache_name="weights-fake")
    assert (target / "config.json").is_file()  # the failed conversion left the old copy alone
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_gguf_conversion_replaces_a_stale_copy_whole_and_keeps_one_finished_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"stands in for a gguf")
    tokenizer = chat_tokenizer()
    monkeypatch.setattr(gguf_cache, "_dequantized_from_gguf",
                        lambda path: (tiny_chat_llama(len(tokenizer), seed=5), tokenizer))
    target = tmp_path / "cache" / "models" / "weights-fake"
    target.mkdir(parents=True)
    (target / "leftover.bin").write_text("from an older, incomplete conversion")

    assert cached_gguf_dir(gguf, cache_name="weights-fake") == target
    assert (target / "config.json").is_file() and not (target / "leftover.bin").exists()  # replaced whole
    assert json.loads((target / SOURCE_RECORD).read_text()) == _source_record(gguf.resolve())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]

    # Another process finishes the same conversion while this one is saving: its copy is kept.
    shutil.rmtree(target)
    real_save = type(tokenizer).save_pretrained

    def save_and_meanwhile(self, directory, *args, **kwargs):
        result = real_save(self, directory, *args, **kwargs)
        shutil.copytree(directory, target)  # stands in for the other process's finished copy
        (target / SOURCE_RECORD).write_text(json.dumps(_source_record(gguf.resolve())))
        (target / "theirs").write_text("")
        return result

    monkeypatch.setattr(type(tokenizer), "save_pretrained", save_and_meanwhile)
    assert cached_gguf_dir(gguf, cache_name="weights-fake") == target
    assert (target / "theirs").exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    first = time.perf_counter() - started
    cache_dir = tmp_path / "cache" / "models" / DEFAULT_MODEL
    config = json.loads((cache_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((cache_dir / SOURCE_RECORD).read_text())["gguf"] == str(default_gguf_path())
    assert model.name_or_path == DEFAULT_MODEL
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token == "<|im_end|>"

    started = time.perf_counter()
    again, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")  # same model, hub name
    second = time.perf_counter() - started
    print(f"default model load: first (GGUF conversion) {first:.1f} s, cached {second:.1f} s")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
