"""DoRA (use_dora): PEFT is the reference for the forward, the gradients, the files and the merge.

Magnitudes and B are randomised (B = 0 and m = ||W|| at creation would make every check pass trivially);
each check also asserts the adapter changes the output, so it can fail.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_mixtral, tiny_model_dir
from lora_cases import Case, build, logits, make_input

import tailor
from tailor.adapters import read_adapter_config
from tailor.config import ConfigError, TrainConfig
from tailor.lora import (
    LoraConfig,
    LoraConfigError,
    LoraTargetError,
    add_lora,
    add_lora_slots,
    disable_adapters,
    lora_layers,
    merge_lora,
    set_active_adapters,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-5

CASES = {  # Linear with and without bias, Conv1D, Embedding, two adapters of different rank
    "llama-qv": Case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "qwen2-all-linear-bias": Case("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    "gpt2-conv1d": Case("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]}),
    "llama-embedding": Case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"],
                                      "use_rslora": True}),
}


def dora(case_name: str) -> dict:
    return {**CASES[case_name].config, "use_dora": True}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 7) -> None:
    """A and B random, each magnitude scaled by 1 + 0.3 N(0, 1) per row (PEFT and tailor name them alike)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(p * (1 + 0.3 * noise) if "lora_magnitude_vector" in name else noise * 0.2)


def peft_model(case_name: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(CASES[case_name], seed), peft.LoraConfig(**dora(case_name)))


def peft_load(case_name: str, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(CASES[case_name]), directory).eval()


def magnitudes(model) -> list[torch.Tensor]:
    return [p for n, p in sorted(model.named_parameters()) if "lora_magnitude_vector" in n]


# ------------------------------------------------------------------------------------------- PEFT interop
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_new_magnitudes_are_pefts_row_norms(case_name):
    ours = add_lora(build(CASES[case_name]), LoraConfig(**dora(case_name)))
    theirs = magnitudes(peft_model(case_name))
    assert len(magnitudes(ours)) == len(theirs) > 0
    for m, reference in zip(magnitudes(ours), theirs, strict=True):
        torch.testing.assert_close(m, reference, atol=0, rtol=0)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_peft_dora_adapter_loads_in_tailor(case_name, tmp_path):
    x = make_input()
    source = peft_model(case_name)
    randomise(source)
    source.eval()
    expected = logits(source, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.save_pretrained(tmp_path / "peft")

    model = build(CASES[case_name])
    tailor.load_adapter(model, tmp_path / "peft")
    assert read_adapter_config(tmp_path / "peft").use_dora
    assert (logits(model, x) - expected).abs().max().item() <= TOLERANCE
    assert (logits(build(CASES[case_name]), x) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_tailor_dora_adapter_loads_in_peft(case_name, tmp_path):
    x = make_input()
    model = add_lora(build(CASES[case_name]), LoraConfig(**dora(case_name)))
    randomise(model)
    expected = logits(model, x)
    tailor.save_adapter(model, tmp_path / "adapter")

    loaded = peft_load(case_name, tmp_path / "adapter")
    assert loaded.peft_config["default"].use_dora
    assert (logits(loaded, x) - expected).abs().max().item() <= TOLERANCE
    assert (logits(build(CASES[case_name]), x) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("case_name", ["qwen2-all-linear-bias", "gpt2-conv1d"])
def test_gradients_and_dropout_in_training_equal_pefts(case_name):
    """The norm is detached in both (DoRA 4.3); with dropout, W x is recomputed from the dropped-out x."""
    config = {**dora(case_name), "lora_dropout": 0.3}
    ours = add_lora(build(CASES[case_name]), LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(CASES[case_name]), peft.LoraConfig(**config))
    randomise(ours)
    randomise(theirs)
    x = make_input()
    grads = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)  # the same dropout masks: both draw them in the same order
        model(input_ids=x).logits.float().pow(2).mean().backward()
        grads.append({_common_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    assert any(k.endswith("lora_magnitude_vector") for k in grads[0])
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], atol=1e-6, rtol=1e-4, msg=key)


def _common_name(name: str) -> str:
    """PEFT's and tailor's names of one adapter parameter, made equal."""
    return name.replace(".default.weight", "").replace(".default", "").removeprefix("base_model.model.")


def test_dora_on_a_quantized_base_dequantizes_like_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tailor.quant import quantize_model

    x = make_input()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}
    for kind in ("nf4", "int8"):
        base = quantize_model(tiny_llama(), kind=kind, compute_dtype=torch.float32)
        model = add_lora(base, LoraConfig(**config))
        randomise(model)
        model.eval()
        expected = logits(model, x)
        tailor.save_adapter(model, tmp_path / kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = quantize_model(tiny_llama(), kind=kind, compute_dtype=torch.float32)
            theirs = peft.PeftModel.from_pretrained(base, tmp_path / kind).eval()
        assert (logits(theirs, x) - expected).abs().max().item() <= TOLERANCE, kind
        assert (logits(tiny_llama(), x) - expected).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_merge_equals_the_adapter_in_float64_and_unmerge_restores(case_name):
    x = make_input()
    model = add_lora(build(CASES[case_name]), LoraConfig(**dora(case_name)))
    randomise(model)
    model.double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(input_ids=x).logits
    with disable_adapters(model):
        assert (model(input_ids=x).logits - expected).abs().max().item() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-10, rtol=1e-10)
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-12, rtol=1e-12, msg=key)
    torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-10, rtol=1e-10)


def test_merged_weight_is_pefts(tmp_path):
    model = add_lora(build(CASES["gpt2-conv1d"]), LoraConfig(**dora("gpt2-conv1d")))
    randomise(model)
    tailor.save_adapter(model, tmp_path / "a")
    ours = tailor.unload_lora(model).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_load("gpt2-conv1d", tmp_path / "a").merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=1e-5, msg=key)


def test_stacked_plain_and_dora_adapters_merge_like_their_forward():
    x = make_input()
    model = add_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                     "plain")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True), "dora")
    set_active_adapters(model, ["plain", "dora"])
    randomise(model)
    model.double()
    expected = model(input_ids=x).logits
    merge_lora(model)
    torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-10, rtol=1e-10)
    unmerge_lora(model)
    with pytest.raises(ValueError, match="DoRA's norm needs the unmerged weight"):
        merge_lora(model, adapter_names=["plain"])
        merge_lora(model, adapter_names=["dora"])


@pytest.mark.slow
def test_tailor_merge_of_a_dora_adapter_passes_its_float64_check(tmp_path):
    from tailor.export import merge_adapter
    from tailor.models import load_model

    model_dir = tiny_model_dir(tmp_path / "model")
    base, _ = load_model(str(model_dir), device="cpu")
    add_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                              base_model_name_or_path=str(model_dir)))
    randomise(base)
    adapter = tailor.save_adapter(base, tmp_path / "adapter")
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.check == "float64" and result.max_abs_diff <= 1e-4


# --------------------------------------------------------------------------------------------- training
def test_a_few_steps_change_magnitude_a_and_b():
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in start)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = make_input()
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for kind in ("lora_magnitude_vector", "lora_A", "lora_B"):
        changed = [not torch.equal(p, start[n]) for n, p in model.named_parameters() if kind in n]
        assert changed and all(changed), kind


# ---------------------------------------------------------------------------------------------- serving
def test_dora_in_the_slots_of_a_mixed_batch_equals_each_row_alone():
    """Per-row slots: a DoRA adapter beside a plain one and the bare base, each row as computed alone."""
    reference = tiny_llama(seed=3)
    add_lora(reference, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True), "dora")
    add_lora(reference, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), "plain")
    set_active_adapters(reference, ["dora", "plain"])  # both trainable: randomised
    randomise(reference)
    base = tiny_llama(seed=3)
    slots = add_lora_slots(base, num_slots=2, max_rank=4)
    for slot, name in enumerate(("dora", "plain")):
        layers = {p: la for p, la in lora_layers(reference).items() if name in la.adapter_names}
        weights = {p: (la.lora_A[name].weight, la.lora_B[name].weight, la.scaling[name])
                   for p, la in layers.items()}
        magnitude = {p: la.lora_magnitude_vector[name] for p, la in layers.items() if la.uses_dora(name)}
        slots.write_prepared(slot, slots.prepare(weights, magnitude))

    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 7))
    names = ["dora", None, "plain", "dora"]
    with slots.rows([0, -1, 1, 0]), torch.no_grad():
        batched = base(input_ids).logits
    with slots.rows([0] * 4), torch.no_grad():  # one adapter for every row: the uniform path
        uniform = base(input_ids).logits
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with disable_adapters(reference):
                    alone = reference(input_ids[row: row + 1]).logits[0]
            else:
                set_active_adapters(reference, name)
                alone = reference(input_ids[row: row + 1]).logits[0]
        torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")
        if name == "dora":
            torch.testing.assert_close(uniform[row], alone, atol=1e-5, rtol=1e-5)
    with disable_adapters(reference), torch.no_grad():
        assert (reference(input_ids[:1]).logits[0] - batched[0]).abs().max().item() > 1e-3


# -------------------------------------------------------------------------------------------- bad input
def test_dora_with_what_cannot_take_it_is_refused_before_any_work():
    with pytest.raises(LoraConfigError, match="use_dora=True cannot adapt target_parameters"):
        LoraConfig(target_parameters=["mlp.experts.gate_up_proj"], use_dora=True)
    with pytest.raises(LoraConfigError, match="use_dora='yes' must be True or False"):
        LoraConfig(use_dora="yes")
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraTargetError, match="use_dora cannot adapt the mixture-of-experts parameters"):
        add_lora(model, LoraConfig(target_modules="all-linear", use_dora=True))
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="use_dora: DoRA is a variant of the LoRA adapter, and method full"):
        TrainConfig(method="full", use_dora=True).validate()


def test_tailor_train_refuses_dora_with_method_full_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--method", "full", "--use-dora", "--data", "builtin:support",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "use_dora" in result.output and "use method lora" in result.output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora-nf4"])
def test_tailor_train_use_dora_saves_a_trained_dora_adapter(method, tmp_path):
    if method.startswith("qlora"):
        pytest.importorskip("bitsandbytes")
    from conftest import write_arithmetic_jsonl
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tailor.cli import app

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=16)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--method", method,
        "--use-dora", "--max-steps", "3", "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
        "--batch-size", "4", "--target-modules", "q_proj,v_proj", "--set", "num_threads=1",
        "--set", "progress=false", "--set", "precision=fp32"])
    assert result.exit_code == 0, result.output
    assert read_adapter_config(out / "adapter").use_dora
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    magnitude_keys = [k for k in weights if k.endswith("lora_magnitude_vector")]
    assert len(magnitude_keys) == 4  # q_proj and v_proj of two layers
    for key in magnitude_keys:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        weight = base[f"{module}.weight"].float()
        if method == "qlora-nf4":  # the weight the adapter saw: quantized from fp32 (precision fp32)
            from tailor.quant.bnb import dequantized_weight, quantized_linear

            weight = dequantized_weight(quantized_linear(weight, None, "nf4", torch.float32), torch.float32)
        start = weight.norm(dim=1)  # m at creation: ||W|| per row (B = 0)
        assert (weights[key] - start).abs().max().item() > 1e-3, key  # trained
        assert weights[key.replace("lora_magnitude_vector", "lora_B.weight")].abs().max().item() > 0


def test_the_norm_kept_between_inference_forwards_follows_changed_weights():
    """Eval mode without gradient keeps ||W + s B A|| per layer; a changed A, B or W is seen at once."""
    x = make_input()
    model = add_lora(build(CASES["llama-qv"]), LoraConfig(**dora("llama-qv")))
    randomise(model)
    model.eval()

    def fresh() -> torch.Tensor:  # a copy, with gradient enabled: nothing kept, computed from scratch
        return copy.deepcopy(model)(input_ids=x).logits.detach()

    with torch.no_grad():
        first = model(input_ids=x).logits
        assert all(layer._norm_cache for layer in lora_layers(model).values())
        assert torch.equal(model(input_ids=x).logits, first)
    torch.testing.assert_close(first, fresh(), atol=0, rtol=0)
    for change in ("lora_B", "lora_A", "base_layer.weight"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if change in name and "q_proj" in name:
                    p.mul_(1.5)  # in place: same storage, a new version
            changed = model(input_ids=x).logits
        assert (changed - first).abs().max().item() > 1e-4, change
        torch.testing.assert_close(changed, fresh(), atol=0, rtol=0, msg=change)
        first = changed


@pytest.mark.slow
def test_compare_trains_dora_beside_lora(tmp_path):
    import json

    from conftest import write_arithmetic_jsonl
    from typer.testing import CliRunner

    from tailor.cli import app

    model = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=16)
    val = write_arithmetic_jsonl(tmp_path / "val.jsonl", n=4, offset=100)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {model}\ndata: {data}\nval_data: {val}\nmax_steps: 2\nbatch_size: 4\nrank: 4\n"
                      "lora_alpha: 8\nlr: 1.0e-3\nnum_threads: 1\nmax_seq_len: 64\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "lora-r2,dora-r2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["methods"]}
    assert list(rows) == ["lora-r2", "dora-r2"] and all(row.get("error") is None for row in rows.values())
    dora_adapter = read_adapter_config(out / "dora-r2" / "run" / "adapter")
    assert dora_adapter.use_dora and dora_adapter.r == 2
    assert not read_adapter_config(out / "lora-r2" / "run" / "adapter").use_dora
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                      use_dora=True))
    assert rows["dora-r2"]["trainable_params"] == reference.get_nb_trainable_parameters()[0]
    assert rows["dora-r2"]["trainable_params"] > rows["lora-r2"]["trainable_params"]  # + the magnitudes


@pytest.mark.slow
def test_a_dora_run_killed_and_resumed_ends_at_the_uninterrupted_adapter(tmp_path):
    """The magnitudes and their optimizer state are in the checkpoint: SIGKILL, --resume, same adapter."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import write_arithmetic_jsonl
    from safetensors.torch import load_file

    from tailor.train.checkpoint import list_checkpoints

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def command(out, *extra):  # dropout > 0: the restored RNG state matters too
        return [sys.executable, "-m", "tailor.cli", "train", "--model", str(model_dir), "--data", str(data),
                "--out", str(out), "--max-steps", "40", "--batch-size", "4", "--rank", "4", "--lora-alpha",
                "8", "--lr", "3e-3", "--save-every", "10", "--use-dora", "--set", "lora_dropout=0.1",
                "--set", "num_threads=1", "--set", "progress=false", *extra]

    subprocess.run(command(tmp_path / "reference"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(killed / "checkpoints"):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint to interrupt"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists()
    result = subprocess.run(command(killed, "--resume"), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

    ours = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any(k.endswith("lora_magnitude_vector") for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
