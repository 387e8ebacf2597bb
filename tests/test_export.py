"""`tailor merge`: the merged transformers directory and the GGUF file give the adapter-applied model's
logits. The reference is PEFT's: PeftModel.from_pretrained(base, adapter) in fp32, computed here.

Tolerances (max |logit difference| against the reference):
  merged directory, float32 weights: 1e-4 (the issue's bound; measured ~2e-7 on tiny models; on
  SmolLM2-135M 1.5e-5 in float64 arithmetic, 1.5e-4 in float32, whose own forward noise is 8e-5 there)
  GGUF f32: 1e-4. f16, bf16, q8_0: GGUF_TOLERANCE[quant] x max(1, largest |logit|) = 4e-3, 2.5e-2, 8e-2 of
  it (measured on SmolLM2-135M: 1.4e-3, 9.3e-3, 3.2e-2 of it; on tiny models ~2e-4, 1e-3, 5e-3 absolute).
  And the file must equal the merged model with the same rounding applied to 1e-4 (measured: 0.0).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_mixtral, tiny_model_dir
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tailor.adapters import AdapterBaseMismatchError, save_adapter
from tailor.cli import app
from tailor.export import GGUF_TOLERANCE, ExportError, GGUFExportError, merge_adapter
from tailor.lora import LoraConfig, add_lora, lora_layers
from tailor.models import load_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FP32 = 1e-4


def randomise(model, seed: int = 0, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters("default"):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_adapter(model_dir: Path, out: Path, targets="all-linear", dtype=torch.bfloat16,
                 quantize=None) -> Path:
    """An adapter trained (here: randomised) on the base in `model_dir`, as the LoRA recipe holds it."""
    model, _ = load_model(str(model_dir), device="cpu")
    model.to(dtype)
    if quantize:
        from tailor.quant import quantize_model

        quantize_model(model, quantize, compute_dtype=dtype)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                               base_model_name_or_path=str(model_dir)))
    randomise(model)
    return save_adapter(model, out)


def reference_logits(model_dir: Path, adapter: Path, ids: torch.Tensor, dtype=None, prepare=None):
    """PEFT's adapter-applied model in fp32: the base as stored (or `dtype`), upcast, adapter unmerged."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").float()
    if prepare is not None:
        prepare(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base.float(), str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


def merged_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_model_dir(root / "model")
    return {"model": model_dir, "adapter": make_adapter(model_dir, root / "adapter")}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------------ directory
def test_merged_directory_matches_the_adapter_from_an_fp32_base(tiny, tmp_path, ids):
    out = tmp_path / "merged"
    result = merge_adapter(tiny["adapter"], out)
    assert result.max_abs_diff <= FP32 and result.prompts == 3
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tailor_export.json"):
        assert (out / name).is_file(), name
    expected = reference_logits(tiny["model"], tiny["adapter"], ids)
    assert (merged_logits(out, ids) - expected).abs().max().item() <= FP32
    base = merged_logits(tiny["model"], ids)
    assert (base - expected).abs().max().item() > 1e-2  # the adapter matters: the check can fail
    record = json.loads((out / "tailor_export.json").read_text())
    assert record["verification"]["max_abs_logit_diff"] == result.max_abs_diff
    assert record["adapter_metadata"]["base"]["name"] == str(tiny["model"])


def test_merged_directory_from_a_bf16_base(tmp_path, ids):
    model_dir = tiny_model_dir(tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(model_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.base_dtype == "bfloat16" and result.max_abs_diff <= FP32
    expected = reference_logits(model_dir, adapter, ids)  # bf16 weights as stored, upcast: the base
    assert (merged_logits(tmp_path / "merged", ids) - expected).abs().max().item() <= FP32


def test_merged_directory_from_an_nf4_base_against_the_dequantized_reference(tmp_path, ids):
    pytest.importorskip("bitsandbytes")
    from tailor.quant import dequantize_model, quantize_model

    model_dir = tiny_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", quantize="nf4")  # a QLoRA adapter
    result = merge_adapter(adapter, tmp_path / "merged")  # auto: the metadata says nf4
    assert any("NF4" in note and "dequantized" in note for note in result.notes)
    assert result.max_abs_diff <= FP32

    def dequantized(base):  # the base as QLoRA trained on it: block linears bf16, NF4, then dequantized
        head = base.get_output_embeddings()
        for module in base.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.to(torch.bfloat16)
        quantize_model(base, "nf4", compute_dtype=torch.bfloat16)
        dequantize_model(base, torch.float32)

    expected = reference_logits(model_dir, adapter, ids, prepare=dequantized)
    got = merged_logits(tmp_path / "merged", ids)
    assert (got - expected).abs().max().item() <= FP32
    plain = reference_logits(model_dir, adapter, ids)  # the same adapter on the unquantized base
    assert (got - plain).abs().max().item() > FP32  # so the dequantization really is what was matched


def test_bf16_output_reports_its_rounding(tiny, tmp_path):
    result = merge_adapter(tiny["adapter"], tmp_path / "bf16", dtype="bfloat16")
    assert result.tolerance is None and 0 < result.max_abs_diff < 0.05
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_with_an_embedding_adapter_are_untied(tmp_path, ids):
    model_dir = tiny_model_dir(tmp_path / "model")
    tied = tiny_llama(0, tie_word_embeddings=True, bos_token_id=None)
    tied.save_pretrained(model_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter", targets=["embed_tokens", "q_proj"])
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.max_abs_diff <= FP32 and any("tie_word_embeddings=false" in n for n in result.notes)
    expected = reference_logits(model_dir, adapter, ids)
    assert (merged_logits(tmp_path / "merged", ids) - expected).abs().max().item() <= FP32


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip_through_transformers_loader(tiny, tmp_path, ids, quant):
    out = tmp_path / f"merged-{quant}.gguf"
    result = merge_adapter(tiny["adapter"], out, gguf=True, quant=quant)
    assert result.max_abs_diff <= result.tolerance and result.file_diff <= FP32
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = back(ids).logits
    expected = reference_logits(tiny["model"], tiny["adapter"], ids)
    tolerance = max(FP32, GGUF_TOLERANCE[quant] * max(1.0, expected.abs().max().item()))
    assert (got - expected).abs().max().item() <= tolerance
    if quant != "f32":
        assert (got - expected).abs().max().item() > 1e-6  # the rounding is real: the bound can bite
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == back.config.vocab_size
    assert json.loads(reader.fields["tailor.adapter"].contents())["base"]["name"] == str(tiny["model"])
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert kinds == {"f32": {"F32"}, "f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0"}}[quant]


def test_gguf_refuses_other_architectures_before_any_work(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model", builder=tiny_mixtral)  # MoE: not written to GGUF
    model, _ = load_model(str(model_dir), device="cpu")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(GGUFExportError, match="supports model_type 'llama'.*'mixtral'.*convert_hf_to_gguf"):
        merge_adapter(adapter, tmp_path / "out.gguf", gguf=True)
    assert not (tmp_path / "out.gguf").exists()
    merge_adapter(adapter, tmp_path / "merged")  # the transformers directory works for any causal LM


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_outputs_and_arguments_are_refused_and_nothing_is_overwritten(tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        merge_adapter(tiny["adapter"], mine)
    (tmp_path / "file.gguf").write_text("not mine")
    with pytest.raises(ExportError, match="not a GGUF file tailor wrote"):
        merge_adapter(tiny["adapter"], tmp_path / "file.gguf", gguf=True)
    assert (tmp_path / "file.gguf").read_text() == "not mine"
    with pytest.raises(ExportError, match="ending in .gguf"):
        merge_adapter(tiny["adapter"], tmp_path / "dir", gguf=True)
    with pytest.raises(ExportError, match="--dtype 'int3'"):
        merge_adapter(tiny["adapter"], tmp_path / "x", dtype="int3")
    with pytest.raises(ExportError, match="--quant 'q2'"):
        merge_adapter(tiny["adapter"], tmp_path / "x.gguf", gguf=True, quant="q2")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()
    merge_adapter(tiny["adapter"], tmp_path / "again")
    merge_adapter(tiny["adapter"], tmp_path / "again")  # an earlier export is replaced


def test_another_base_is_refused_unless_forced(tiny, tmp_path):
    other = tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(AdapterBaseMismatchError, match=str(other)):
        merge_adapter(tiny["adapter"], tmp_path / "x", model=str(other))
    assert not (tmp_path / "x").exists()
    with pytest.warns(UserWarning, match="forced"):
        merge_adapter(tiny["adapter"], tmp_path / "x", model=str(other), force=True)


def test_merge_a_store_reference(tiny, tmp_path):
    from tailor.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    store.add("support", tiny["adapter"])
    store.tag("support@prod", 1)
    result = merge_adapter("support@prod", tmp_path / "merged", store=store.root)
    assert result.adapter == "support@1" and result.max_abs_diff <= FP32
    record = json.loads((tmp_path / "merged" / "tailor_export.json").read_text())
    assert record["adapter"] == "support@1"


def test_cli_prints_the_verification_figure(tiny, tmp_path):
    result = runner.invoke(app, ["merge", "--adapter", str(tiny["adapter"]), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in result.output and "(limit 0.0001)" in result.output
    missing = ["merge", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "n")]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_default_model_merge_and_gguf(tmp_path):
    model, tokenizer = load_model("SmolLM2-135M-Instruct", device="cpu")
    model.to(torch.bfloat16)
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomise(model, scale=0.02)
    adapter = save_adapter(model, tmp_path / "adapter")
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.max_abs_diff <= FP32  # float64 arithmetic; in float32 the forward pass alone is ~1e-4 off
    for quant in ("f16", "q8_0"):
        gguf_result = merge_adapter(adapter, tmp_path / f"smol-{quant}.gguf", gguf=True, quant=quant)
        assert gguf_result.gguf["pre_tokenizer"] == "smollm"
        assert gguf_result.file_diff <= FP32
        assert gguf_result.max_abs_diff <= gguf_result.tolerance, (quant, gguf_result.max_abs_diff)
