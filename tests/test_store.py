"""The adapter store: versions, tags, rollback, lineage, names that stay names, atomicity under SIGKILL, and
`tailor train --register`. Every adapter tailor writes carries tailor_metadata.json; load_adapter checks
its base fingerprint (mismatch refused unless forced; another dtype warned); PEFT still loads it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_model_dir, write_arithmetic_jsonl
from safetensors.torch import save_file
from typer.testing import CliRunner

from tailor.adapters import (
    AdapterBaseMismatchError,
    AdapterDtypeWarning,
    AdapterMetadataError,
    load_adapter,
    read_metadata,
    save_adapter,
)
from tailor.adapters.store import AdapterStore, StoreError, default_root
from tailor.cli import app
from tailor.lora import LoraConfig, add_lora, lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_adapter(path: Path, seed: int = 0, base_seed: int = 0, r: int = 2, dtype=torch.float32) -> Path:
    model = tiny_llama(base_seed).to(dtype)
    add_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters("default"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return save_adapter(model, path)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def adapters(tmp_path) -> list[Path]:
    return [make_adapter(tmp_path / f"adapter{i}", seed=i) for i in range(3)]


# ------------------------------------------------------------------------------------------------ metadata
def test_every_saved_adapter_carries_metadata_and_peft_still_loads_it(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    path = make_adapter(tmp_path / "a")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "tailor_metadata.json"]
    metadata = read_metadata(path)
    base = metadata["base"]
    assert base["model_type"] == "llama" and len(base["config_sha256"]) == len(base["weights_sha256"]) == 64
    assert metadata["precision"] == {"base_dtype": "float32", "base_quantization": None,
                                     "adapter_dtype": "float32"}
    assert metadata["tailor_version"] and metadata["created"].endswith("Z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(0), str(path)).eval()
    model = tiny_llama(0)
    load_adapter(model, path)
    with torch.no_grad():
        assert (theirs(input_ids).logits - model(input_ids).logits).abs().max().item() <= 1e-5


def test_fingerprint_is_the_same_for_fp32_and_bf16_copies_and_differs_between_models(tmp_path):
    from tailor.adapters import base_fingerprint

    fp32, bf16, other = tiny_llama(0), tiny_llama(0).to(torch.bfloat16), tiny_llama(1)
    fp32.config.use_cache = False  # training changes such runtime settings; they are not the base
    assert base_fingerprint(fp32)["weights_sha256"] == base_fingerprint(bf16)["weights_sha256"]
    assert base_fingerprint(fp32)["config_sha256"] == base_fingerprint(bf16)["config_sha256"]
    assert base_fingerprint(fp32)["weights_sha256"] != base_fingerprint(other)["weights_sha256"]
    wider = tiny_llama(0, rms_norm_eps=1e-5)  # same weights, another architecture setting
    assert base_fingerprint(fp32)["config_sha256"] != base_fingerprint(wider)["config_sha256"]


def test_loading_into_another_base_is_refused_naming_both_unless_forced(tmp_path, input_ids):
    path = make_adapter(tmp_path / "a", base_seed=0)
    model = tiny_llama(1)  # same shapes, other weights: only the fingerprint tells
    before = model(input_ids).logits
    with pytest.raises(AdapterBaseMismatchError) as caught:
        load_adapter(model, path)
    message = str(caught.value)
    assert str(path) in message and message.count("weights ") >= 2 and "force" in message
    assert torch.equal(model(input_ids).logits, before)  # untouched
    with pytest.warns(UserWarning, match="Loaded anyway"):
        load_adapter(model, path, force=True)


def test_another_dtype_is_a_warning(tmp_path):
    path = make_adapter(tmp_path / "bf16", dtype=torch.bfloat16)
    with pytest.warns(AdapterDtypeWarning, match="bfloat16 base .* float32"):
        load_adapter(tiny_llama(0), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_llama(0).to(torch.bfloat16), path)  # the trained dtype: silent


def test_adapters_without_metadata_load_as_before_and_bad_metadata_is_named(tmp_path):
    path = make_adapter(tmp_path / "a")
    (path / "tailor_metadata.json").unlink()
    load_adapter(tiny_llama(1), path)  # a PEFT adapter: no fingerprint, no check
    path = make_adapter(tmp_path / "b")
    (path / "tailor_metadata.json").write_text("{broken")
    with pytest.raises(AdapterMetadataError, match="tailor_metadata.json.*delete it"):
        load_adapter(tiny_llama(0), path)
    with pytest.warns(UserWarning, match="without the base check"):
        load_adapter(tiny_llama(0), path, force=True)


# ------------------------------------------------------------------------------------------------ versions
def test_versions_tags_rollback_and_resolve(store, adapters):
    assert [store.add("support", a) for a in adapters] == [(f"support@{i}", True) for i in (1, 2, 3)]
    assert store.add("support", adapters[1]) == ("support@2", False)  # identical: not stored twice
    assert store.versions("support") == [1, 2, 3]
    assert store.resolve("support") == store.resolve("support@latest") == store.root / "support" / "3"
    assert store.tag("support@prod", 1) == (None, 1)
    assert store.tag("support@prod", "support@3") == (1, 3)
    assert store.tag("support@staging", "support@prod") == (None, 3)  # a tag names a version via a tag
    assert store.resolve("support@prod") == store.root / "support" / "3"
    assert store.rollback("support@prod") == (3, 1)
    assert store.resolve("support@prod") == store.root / "support" / "1"
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback("support@prod")
    # the version directory is an ordinary adapter: tailor loads it as it is
    load_adapter(tiny_llama(0), store.resolve("support@prod"))


def test_rm_refuses_a_tagged_version_unless_forced(store, adapters):
    for a in adapters[:2]:
        store.add("support", a)
    store.tag("support@prod", 1)
    store.tag("support@prod", 2)
    with pytest.raises(StoreError, match="tags point at it.*support@prod -> 2.*--force"):
        store.remove("support@2")
    assert store.versions("support") == [1, 2]
    with pytest.raises(StoreError, match="is a tag"):
        store.remove("support@prod")
    assert store.remove("support@1") == ["support@1"]  # only in prod's history: not protected
    with pytest.raises(StoreError, match="version 1 before, but that version was removed"):
        store.rollback("support@prod")
    assert store.remove("support@2", force=True) == ["support@2", "support@prod (tag)"]
    assert store.versions("support") == [] and store.tags("support") == {}
    store.add("support", adapters[2])
    assert store.versions("support") == [3]  # numbers are never reused


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/abs", "..", ".hidden", "x" * 65, "sp ace", "ü", ""])
def test_names_are_names(store, adapters, bad):
    with pytest.raises(StoreError, match="not allowed|empty"):
        store.add(bad, adapters[0])
    with pytest.raises(StoreError):
        store.resolve(bad)
    assert not store.root.exists() or all(p.parent == store.root for p in store.root.iterdir())


def test_bad_tags_and_references(store, adapters):
    store.add("support", adapters[0])
    for tag in ("support@7", "support@latest", "support@../x"):
        with pytest.raises(StoreError):
            store.tag(tag, 1)
    with pytest.raises(StoreError, match="no version 9; its versions are 1"):
        store.resolve("support@9")
    with pytest.raises(StoreError, match="no tag 'prod'"):
        store.resolve("support@prod")
    with pytest.raises(StoreError, match="no adapter named 'billing'.*names: support"):
        store.resolve("billing")
    with pytest.raises(StoreError, match="only point at a version of support"):
        store.add("billing", adapters[1])
        store.tag("support@prod", "billing@1")


def test_corrupt_tags_file_is_named_with_the_fix(store, adapters):
    store.add("support", adapters[0])
    (store.root / "support" / "tags.json").write_text("{not json")
    with pytest.raises(StoreError, match="tags.json.*delete it"):
        store.resolve("support@prod")


def test_add_refuses_what_is_not_an_adapter(store, tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(StoreError, match="run directory: pass .*adapter"):
        store.add("support", tmp_path / "run")
    with pytest.raises(StoreError, match="does not exist"):
        store.add("support", tmp_path / "missing")
    broken = make_adapter(tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(StoreError, match="not a readable safetensors"):
        store.add("support", broken)
    assert store.names() == []


def test_root_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TAILOR_ADAPTERS", raising=False)
    monkeypatch.delenv("TAILOR_CACHE", raising=False)
    assert default_root() == Path("~/.cache/tailor/adapters").expanduser()
    monkeypatch.setenv("TAILOR_ADAPTERS", str(tmp_path / "elsewhere"))
    assert AdapterStore().root == tmp_path / "elsewhere"


# ------------------------------------------------------------------------------------------------ SIGKILL
TAGGER = """
import sys
from tailor.adapters.store import AdapterStore
store = AdapterStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    store.tag("support@prod", 1 + i % 3)
    if i % 3 == 2:
        store.rollback("support@prod")
    i += 1
"""

ADDER = """
import sys
from tailor.adapters.store import AdapterStore
store = AdapterStore(sys.argv[1])
print("ready", flush=True)
store.add("big", sys.argv[2])
"""


def _killed_child(code: str, *args: str, delay: float) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def test_tag_and_rollback_survive_sigkill_at_any_moment(store, adapters):
    for a in adapters:
        store.add("support", a)
    store.tag("support@prod", 1)
    rng = random.Random(0)
    for _ in range(8):
        _killed_child(TAGGER, str(store.root), delay=rng.uniform(0.02, 0.3))
        tags = json.loads((store.root / "support" / "tags.json").read_text())  # whole JSON, never half
        prod = tags["tags"]["prod"]
        assert prod["version"] in (1, 2, 3) and set(prod["history"]) <= {1, 2, 3}
        assert store.resolve("support@prod").is_dir()
    assert store.tag("support@prod", 2)[1] == 2  # the lock died with the process: the store writes on
    leftovers = [p.name for p in (store.root / "support").iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the next writer cleaned what the killed ones left


def test_add_survives_sigkill_without_a_half_version(store, tmp_path):
    big = make_adapter(tmp_path / "big")
    big_tensor = {"base_model.model.x.lora_A.weight": torch.zeros(2048, 2048)}  # 16 MiB: a slow copy
    save_file(big_tensor, str(big / "adapter_model.safetensors"))
    size = (big / "adapter_model.safetensors").stat().st_size
    rng = random.Random(1)
    for _ in range(4):
        _killed_child(ADDER, str(store.root), str(big), delay=rng.uniform(0.0, 0.15))
        for version in store.versions("big"):  # a version is there whole, or not at all
            directory = store.resolve(f"big@{version}")
            assert (directory / "adapter_model.safetensors").stat().st_size == size
            assert (directory / "store_record.json").is_file()
    ref, _ = store.add("big", big)
    assert store.resolve(ref).is_dir() and len(store.versions("big")) == 1


# ------------------------------------------------------------------------------------------------ views
def test_list_show_and_diff(store, tmp_path, adapters):
    store.add("support", adapters[0])
    other = make_adapter(tmp_path / "r4", seed=5, r=4)
    from tailor.adapters.metadata import update_metadata

    update_metadata(other, metrics={"final_val_loss": 0.25}, train_config={"method": "lora", "lr": 1e-3})
    store.add("support", other)
    store.tag("support@prod", 2)
    rows = {r["ref"]: r for r in store.rows()}
    assert rows["support@2"]["tags"] == ["prod"] and rows["support@2"]["rank"] == 4
    assert rows["support@2"]["targets"] == "q_proj,v_proj" and rows["support@2"]["size_bytes"] > 1000
    assert rows["support@2"]["metric"] == ("final_val_loss", 0.25)
    info = store.info("support@prod")
    assert info["ref"] == "support@2" and info["metadata"]["train_config"]["lr"] == 1e-3
    differences = {key: (a, b) for key, a, b in store.diff("support@1", "support@prod")}
    assert differences["adapter.r"] == (2, 4) and differences["metrics.final_val_loss"] == (None, 0.25)
    assert "base.weights_sha256" not in differences and "weights_sha256" in differences  # same base


def test_cli_commands(tmp_path, adapters):
    root = str(tmp_path / "store")

    def run(*args: str) -> str:
        result = runner.invoke(app, ["adapters", *args, "--store", root])
        assert result.exit_code == 0, result.output
        return result.output

    assert "added support@1" in run("add", "support", str(adapters[0]))
    assert "added support@2" in run("add", "support", str(adapters[1]))
    assert "support@prod -> support@1" in run("tag", "support@prod", "1")
    assert "(was support@1)" in run("tag", "support@prod", "2")
    listing = run("list")
    assert "support@2" in listing and "prod" in listing and "q_proj,v_proj" in listing
    assert json.loads(run("list", "--json"))[1]["tags"] == ["prod"]
    assert "lineage:" in run("show", "support@prod")
    assert "weights_sha256" in run("diff", "support@1", "support@2")
    assert "support@prod -> support@1 (was support@2)" in run("rollback", "support@prod")
    refused = runner.invoke(app, ["adapters", "rm", "support@1", "--store", root])
    assert refused.exit_code == 2 and "--force" in refused.output and "Traceback" not in refused.output
    assert "removed support@1" in run("rm", "support@1", "--force")
    bad = runner.invoke(app, ["adapters", "add", "../escape", str(adapters[0]), "--store", root])
    assert bad.exit_code == 2 and "a name, never a path" in bad.output
    assert not (tmp_path / "escape").exists()


# ------------------------------------------------------------------------------------------------ train
def test_train_register_records_config_data_hash_and_metrics(tmp_path, monkeypatch):
    import hashlib

    from tailor.train import load_config, train

    monkeypatch.setenv("TAILOR_ADAPTERS", str(tmp_path / "store"))
    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=24)
    config = load_config(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_steps=2,
                         batch_size=4, rank=2, lora_alpha=4, progress=False, num_threads=1,
                         register="support", precision="bf16")
    train(config)
    store = AdapterStore()
    assert store.versions("support") == [1]
    metadata = store.info("support@1")["metadata"]
    assert metadata["data"]["sources"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert metadata["data"]["examples"] == {"train": 22, "validation": 2}
    assert metadata["train_config"]["register"] == "support" and metadata["train_config"]["rank"] == 2
    assert metadata["metrics"]["steps"] == 2 and "final_val_loss" in metadata["metrics"]
    assert metadata["precision"]["base_dtype"] == "bfloat16"  # LoRA in bf16 stores the base in bf16
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["registered_as"] == "support@1"
    # the registered adapter loads into its base (fp32 here: a dtype warning, no error)
    from tailor.models import load_model

    base, _ = load_model(str(model_dir), device="cpu")
    with pytest.warns(AdapterDtypeWarning):
        load_adapter(base, store.resolve("support"))


def test_register_is_validated_before_training(tmp_path):
    from tailor.config import ConfigError
    from tailor.train import load_config

    with pytest.raises(ConfigError, match="register: adapter name '../x' is not allowed"):
        load_config(data="builtin:support", register="../x")
    with pytest.raises(ConfigError, match="register: method full delivers a whole model"):
        load_config(data="builtin:support", register="ok", method="full")
