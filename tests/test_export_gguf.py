"""GGUF for llama.cpp and Ollama: the LoRA adapter GGUF (`tailor merge --gguf --lora-only`), merged GGUFs of
every architecture tailor writes, and the Ollama directory (`--ollama`).

References: PEFT's own delta weights (the adapter GGUF's updates, read back with transformers' GGUF
un-permutation), and llama.cpp itself (llama-cpp-python, built from source once: tests/llama_cpp_check.py):
its greedy tokens from the base GGUF + LoRA GGUF and from the merged GGUF must equal tailor's own greedy
generation (tailor.serve's engine on the adapter-applied model), 16 tokens on chat prompts, all tensors
float32 (f32 GGUF, float32 KV cache). Its prompt logits must be within LLAMA_CPP_LOGITS of tailor's
(float32 arithmetic in two implementations: measured up to ~1e-5 of the largest |logit| here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_mixtral, tiny_model_dir
from gguf import GGUFReader
from gguf_cases import CONFIGS, write_case
from llama_cpp_check import llama_cpp_greedy, llama_cpp_module
from test_export import make_adapter, randomise
from typer.testing import CliRunner

from tailor.adapters import save_adapter
from tailor.adapters.format import load_adapter
from tailor.cli import app
from tailor.data.tokenize import render_chat
from tailor.export import GGUFExportError, merge_adapter
from tailor.export.gguf_arch import ARCHITECTURES, arch_name, tensor_namer
from tailor.export.gguf_lora import export_lora_gguf, read_lora_deltas
from tailor.export.ollama import CHATML_TEMPLATE, chat_format, export_ollama
from tailor.lora import LoraConfig, add_lora, disable_adapters
from tailor.models import load_model
from tailor.serve.engine import Engine
from tailor.serve.sampling import SamplingParams, stop_token_ids

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
           "Where is my order ORD-12345? It was due yesterday.")
NEW_TOKENS = 16
# llama.cpp's prompt logits vs tailor's, as a share of the largest |logit|, both in float32. Measured on the
# tiny models: llama, mistral, qwen2, qwen3, phi3 <= 3.3e-6; gemma2 1.1e-3, gemma3 5.3e-4 (ggml's CPU GELU
# reads a float16 table; Gemma's MLP is GELU, the others' SiLU).
LLAMA_CPP_LOGITS = 1e-4
LLAMA_CPP_LOGITS_GELU = 3e-3


def chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def tailor_greedy(model, tokenizer, prompts) -> tuple[list[list[int]], list[np.ndarray]]:
    """tailor's own greedy tokens (the serving engine) and the prompt logits, of `model` as it is."""
    engine = Engine(model, tokenizer, max_batch=len(prompts), max_model_len=256)
    tokens = [r.output_ids for r in engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))]
    logits = [model(input_ids=torch.tensor([p])).logits[0].double().numpy() for p in prompts]
    return tokens, logits


def assert_llama_cpp_agrees(model_file, prompts, expected_tokens, expected_logits, stops, lora=None,
                            tolerance=LLAMA_CPP_LOGITS):
    tokens, logits = llama_cpp_greedy(model_file, prompts, NEW_TOKENS, stops, lora=lora)
    assert tokens == expected_tokens
    largest = max(float(np.abs(x).max()) for x in expected_logits)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, expected_logits, strict=True))
    assert diff <= tolerance * largest, (diff, largest)
    return diff / largest


# ------------------------------------------------------------------------------------------------ LoRA GGUF
def test_lora_gguf_holds_peft_updates_in_llama_cpp_format(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    model, _ = load_model(str(model_dir), device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                        alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 2},
                        base_model_name_or_path=str(model_dir))
    add_lora(model, config)
    randomise(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "adapter.gguf"
    result = export_lora_gguf(adapter, out, quant="f32")
    assert result.pairs == 14 and result.relative_diff <= 1e-6 and result.architecture == "llama"

    fields = GGUFReader(str(out)).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0
    base = AutoModel(model_dir)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter))
    name_of = tensor_namer(ARCHITECTURES["llama"], base.config.num_hidden_layers)
    expected = {}
    for path, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            expected[f"{name_of(path)}.weight"] = module.get_delta_weight("default").double().numpy()
    deltas = read_lora_deltas(out, base.config)
    assert set(deltas) == set(expected) and len(expected) == 14
    for name, delta in expected.items():  # rsLoRA, alpha_pattern and rank_pattern scales folded into B
        np.testing.assert_allclose(deltas[name], delta, atol=1e-6 * np.abs(delta).max(), err_msg=name)
    # the file's own B rows are GGML's rotary order (permuted), the same values as PEFT's B (times the
    # scale folded in: rsLoRA's alpha/sqrt(r) over llama.cpp's alpha/r = 2)
    raw = {t.name: np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)])
           for t in GGUFReader(str(out)).tensors}
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    hf_b = q_proj.lora_B["default"].weight.detach().numpy() * 2
    file_b = raw["blk.0.attn_q.weight.lora_b"]
    np.testing.assert_allclose(np.sort(file_b, axis=None), np.sort(hf_b, axis=None), rtol=1e-6)
    assert file_b.shape == hf_b.shape and not np.allclose(file_b, hf_b)


def AutoModel(model_dir):  # noqa: N802 - the reference model, as PEFT users load it
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _edit_config(adapter, **fields) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_lora_only_refuses_what_llama_cpp_cannot_apply_and_writes_nothing(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", targets=["q_proj"])
    out = tmp_path / "out.gguf"
    _edit_config(adapter, use_dora=True)
    with pytest.raises(GGUFExportError, match="use_dora is true.*DoRA.*Drop --lora-only"):
        export_lora_gguf(adapter, out)
    _edit_config(adapter, use_dora=False, target_parameters=["mlp.experts.gate_up_proj"], bias="all")
    with pytest.raises(GGUFExportError, match="target_parameters=.*mixture-of-experts.*; bias='all'"):
        export_lora_gguf(adapter, out)
    assert not out.exists()
    cli = runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", str(out), "--gguf", "--lora-only"])
    assert cli.exit_code == 2 and "use_dora" not in cli.output and "target_parameters" in cli.output
    assert not out.exists()
    cli = runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", str(out), "--lora-only"])
    assert cli.exit_code == 2 and "add --gguf" in cli.output


def test_an_architecture_llama_cpp_is_not_given_is_refused_before_any_work(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model", builder=tiny_mixtral)
    model, _ = load_model(str(model_dir), device="cpu")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "adapter")
    for call in (lambda: export_lora_gguf(adapter, tmp_path / "a.gguf"),
                 lambda: merge_adapter(adapter, tmp_path / "m.gguf", gguf=True),
                 lambda: export_ollama(adapter, tmp_path / "ollama")):
        with pytest.raises(GGUFExportError, match="'mixtral'.*convert_hf_to_gguf"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model"]


def test_a_sentencepiece_style_vocabulary_is_refused_before_the_merge(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", targets=["q_proj"])
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True  # Llama 2 / Mistral / Gemma style
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    import tailor.models

    monkeypatch.setattr(tailor.models, "load_model", None)  # the refusal comes before any model load
    with pytest.raises(GGUFExportError, match="SentencePiece-style.*--lora-only"):
        merge_adapter(adapter, tmp_path / "m.gguf", gguf=True)
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------------------------------ Ollama
def test_chatml_becomes_ollamas_template_with_the_default_system_prompt():
    from tailor.models import load_tokenizer

    smol = chat_format(load_tokenizer("SmolLM2-135M-Instruct"))  # ChatML that adds a system prompt itself
    assert smol.template == CHATML_TEMPLATE and smol.stops == ["<|im_start|>", "<|im_end|>"]
    assert smol.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct")
    tokenizer.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    other = chat_format(tokenizer)
    assert other.template is None and "not ChatML" in other.note and other.stops == [tokenizer.eos_token]


def test_ollama_directory_merged_and_lora_only(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    merged = export_ollama(adapter, tmp_path / "merged", quant="f32")
    assert sorted(p.name for p in merged.out.iterdir()) == ["Modelfile", "model.gguf", "tailor_export.json"]
    text = (merged.out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and "ADAPTER" not in text
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text and "SYSTEM" not in text  # conftest's ChatML adds none
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert merged.merge.max_abs_diff <= 1e-4
    cli = runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", str(tmp_path / "lora"), "--ollama",
                              "--lora-only", "--quant", "f32"])
    assert cli.exit_code == 0, cli.output
    lora = tmp_path / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["Modelfile", "adapter.gguf", "base.gguf",
                                                      "tailor_export.json"]
    text = (lora / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in text
    assert GGUFReader(str(lora / "base.gguf")).fields["general.type"].contents() == "model"
    assert GGUFReader(str(lora / "adapter.gguf")).fields["general.type"].contents() == "adapter"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        export_ollama(adapter, tmp_path / "mine")


# ------------------------------------------------------------------------------------------------ llama.cpp
@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_llama_cpp_runs_each_architecture_like_tailor(model_type, tmp_path):
    """Merged GGUF, and base GGUF + LoRA GGUF, of a tiny random model: llama.cpp loads both and its greedy
    tokens equal tailor's."""
    llama_cpp_module()  # built once, or skipped with the reason
    model_dir = write_case(model_type, tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", dtype=torch.float32)
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32, device="cpu")
    prompts = chat_prompts(tokenizer)
    stops = set(stop_token_ids(model, tokenizer))
    tolerance = LLAMA_CPP_LOGITS_GELU if model_type.startswith("gemma") else LLAMA_CPP_LOGITS
    base_tokens, base_logits = tailor_greedy(model, tokenizer, prompts)
    from tailor.export.gguf import write_gguf

    write_gguf(model, tokenizer, tmp_path / "base.gguf", "f32")
    assert_llama_cpp_agrees(tmp_path / "base.gguf", prompts, base_tokens, base_logits, stops,
                            tolerance=tolerance)
    load_adapter(model, adapter)
    tokens, logits = tailor_greedy(model, tokenizer, prompts)
    assert tokens != base_tokens  # the adapter changes the answers: the comparisons below can fail

    merge_adapter(adapter, tmp_path / "merged.gguf", gguf=True, quant="f32")
    fields = GGUFReader(str(tmp_path / "merged.gguf")).fields
    assert fields["general.architecture"].contents() == arch_name(ARCHITECTURES[model_type])
    assert_llama_cpp_agrees(tmp_path / "merged.gguf", prompts, tokens, logits, stops, tolerance=tolerance)
    export_lora_gguf(adapter, tmp_path / "adapter.gguf", quant="f32")
    assert_llama_cpp_agrees(tmp_path / "base.gguf", prompts, tokens, logits, stops,
                            lora=tmp_path / "adapter.gguf", tolerance=tolerance)


@pytest.mark.slow
def test_llama_cpp_runs_the_default_model_with_the_lora_gguf_and_merged_like_tailor(tmp_path):
    """SmolLM2-135M-Instruct with a trained-looking r=8 all-linear adapter (random non-zero A and B),
    float32 GGUFs: the Ollama directory's base.gguf + adapter.gguf, and the merged GGUF."""
    llama_cpp_module()
    model, tokenizer = load_model("SmolLM2-135M-Instruct", dtype=torch.float32, device="cpu")
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomise(model, scale=0.02)
    adapter = save_adapter(model, tmp_path / "adapter")
    prompts = chat_prompts(tokenizer)
    stops = set(stop_token_ids(model, tokenizer))
    tokens, logits = tailor_greedy(model, tokenizer, prompts)
    with torch.no_grad(), disable_adapters(model):
        base_tokens = tailor_greedy(model, tokenizer, prompts)[0]
    assert tokens != base_tokens

    ollama = export_ollama(adapter, tmp_path / "ollama", lora_only=True, quant="f32")
    assert ollama.chat.system.startswith("You are a helpful AI assistant named SmolLM")
    lora_diff = assert_llama_cpp_agrees(tmp_path / "ollama" / "base.gguf", prompts, tokens, logits, stops,
                                        lora=tmp_path / "ollama" / "adapter.gguf")
    merge_adapter(adapter, tmp_path / "merged.gguf", gguf=True, quant="f32")
    merged_diff = assert_llama_cpp_agrees(tmp_path / "merged.gguf", prompts, tokens, logits, stops)
    print(f"llama.cpp vs tailor, prompt logits, of the largest: LoRA GGUF {lora_diff:.1e}, merged "
          f"{merged_diff:.1e}")

