"""Lean loading (tailor.models.lean): the model as the run uses it, never the whole model wider first.

Reference: the ordinary way, `from_pretrained` in fp32 (or the target dtype) and then cast or quantize with
tailor.quant, gives the same logits; and the peak memory of a QLoRA load stays far below the fp32 model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model_dir, tiny_qwen2
from transformers import AutoModelForCausalLM, LlamaConfig

from tailor.models import load_model
from tailor.models.lean import SafetensorsFiles
from tailor.models.random import write_random_model


def _bf16_checkpoint(tmp_path: Path, builder=None) -> Path:
    """A tiny model saved as bf16 safetensors (what people download), with its tokenizer."""
    source = tiny_model_dir(tmp_path / "fp32", builder=builder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    target = tmp_path / "bf16"
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def _ordinary(directory: Path, dtype: torch.dtype, quantize: str | None) -> torch.nn.Module:
    from tailor.quant import quantize_model

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return quantize_model(model, quantize, compute_dtype=dtype) if quantize else model


@pytest.mark.parametrize("dtype, quantize", [
    (torch.float32, None),        # LoRA where bf16 is not native: fp32
    (torch.bfloat16, None),       # LoRA with native bf16: the base stored in bf16
    (torch.float32, "nf4"),       # QLoRA NF4 computing in fp32
    (torch.bfloat16, "nf4"),
    (torch.float32, "int8"),      # QLoRA int8
])
@pytest.mark.parametrize("builder", [None, tiny_qwen2], ids=["llama", "qwen2-bias"])
def test_lean_load_equals_the_ordinary_load(tmp_path, one_thread, dtype, quantize, builder):
    if quantize:
        pytest.importorskip("bitsandbytes")
    directory = _bf16_checkpoint(tmp_path, builder)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    lean, _ = load_model(str(directory), dtype=dtype, device="cpu", quantize=quantize)
    reference = _ordinary(directory, dtype, quantize)
    assert {n: p.dtype for n, p in lean.named_parameters()} == \
        {n: p.dtype for n, p in reference.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(lean(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_tied_weights_stay_tied_and_buffers_keep_their_dtype(tmp_path):
    directory = _bf16_checkpoint(tmp_path, lambda seed, **kw: _tied_llama(seed, **kw))
    model, _ = load_model(str(directory), dtype=torch.float32, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for name, buffer in reference.named_buffers():
        assert dict(model.named_buffers())[name].dtype == buffer.dtype, name


def _tied_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, **overrides)
    return LlamaForCausalLM(config).eval()


def test_safetensors_files_read_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    directory = _bf16_checkpoint(tmp_path)
    files = SafetensorsFiles(directory)
    expected = load_file(str(directory / "model.safetensors"))
    assert set(files.tensors) == set(expected)
    assert files.floating_dtype() == torch.bfloat16
    for key, tensor in expected.items():
        assert torch.equal(files.read(key), tensor), key


def test_a_truncated_checkpoint_is_one_clear_error(tmp_path):
    from tailor.models import ModelLoadError

    directory = _bf16_checkpoint(tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ModelLoadError, match="model.safetensors|cannot be loaded"):
        load_model(str(directory), device="cpu")


_PEAK = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    import tailor.models, tailor.quant, bitsandbytes  # imported before the baseline is read

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    directory, how = sys.argv[1], sys.argv[2]
    baseline = rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark starts again from here
        handle.write("5")
    if how == "lean":
        model, _ = tailor.models.load_model(directory, dtype=torch.float32, device="cpu", quantize="nf4")
    else:  # the ordinary way: the fp32 model first, then quantized
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tailor.quant.quantize_model(model, "nf4", compute_dtype=torch.float32)
    print(json.dumps({"peak_bytes": rss("VmHWM:") - baseline}))
""")


@pytest.mark.slow
def test_qlora_loading_never_holds_the_fp32_model(tmp_path):
    """A 0.1B-parameter random Llama (bf16 on disk): loading it for QLoRA peaks at a fraction of its fp32
    size; the ordinary path (fp32 first, then quantize) holds all of it."""
    pytest.importorskip("bitsandbytes")
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=5,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    tokenizer = str(tiny_model_dir(tmp_path / "tokenizer"))
    directory = write_random_model(config, tmp_path / "model", tokenizer_from=tokenizer)
    fp32_bytes = 4 * sum(t.nbytes // t.dtype.itemsize for t in SafetensorsFiles(directory).tensors.values())
    peaks = {}
    for how in ("lean", "ordinary"):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(directory), how], capture_output=True,
                             text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        peaks[how] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / fp32_bytes
    # lean: NF4 block linears (0.13x of their fp32 bytes) + the fp32 embeddings and head (17% of the model)
    # + one tensor in flight: 0.38 measured; the ordinary load: the fp32 model and more (1.52 measured)
    assert peaks["lean"] < 0.5, peaks
    assert peaks["ordinary"] > 1.0, peaks  # the fp32 model, whole: what lean loading avoids
