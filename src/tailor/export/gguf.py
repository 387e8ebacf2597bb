"""Write a (merged) transformers model as one GGUF file, with the `gguf` package.

Every architecture in `tailor.export.gguf_arch.ARCHITECTURES` (llama, mistral, qwen2, qwen3, gemma2,
gemma3, phi3): tensor names from gguf-py's own name map for it (`get_tensor_name_map`, the table llama.cpp's
convert_hf_to_gguf.py uses and transformers' GGUF loader reads back): ``token_embd``, ``blk.N.attn_q`` ...
``output_norm``, ``output``; q/k rows permuted for llama, Gemma's norms shifted, the hyper-parameters as
the converter writes them (see gguf_arch). 1-D tensors (norms, biases) stay float32, as llama.cpp writes
them.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens, token types, merges,
special token ids, the chat template, and the pre-tokenizer name llama.cpp recognises by hashing the
tokenizer's output on its check text (`tokenizer.ggml.pre`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tailor.export.gguf_arch import (
    GGUFExportError,
    _gguf,
    arch_name,
    architecture,
    check_exportable,
    tensor_namer,
    to_gguf_layout,
    write_metadata,
)

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0")
# How far the GGUF file's logits (loaded back by transformers' GGUF loader) may be from the adapter-applied
# model's, as a share of the largest |logit| (at least 1 is assumed): the rounding of the tensor type.
# Measured on SmolLM2-135M with an r=8 all-linear adapter, largest |logit| 38.8, float64 arithmetic:
# f32 1.5e-5, f16 0.053, bf16 0.36, q8_0 1.24, i.e. 1.4e-3, 9.3e-3, 3.2e-2 of it (2.5-3x below these).
# Separately, the file must equal the merged model with the same rounding applied (`round_like_gguf`)
# to 1e-4: that part checks names, layout and permutations exactly.
GGUF_TOLERANCE = {"f32": 0.0, "f16": 4e-3, "bf16": 2.5e-2, "q8_0": 8e-2}
# llama.cpp's check text and the pre-tokenizers it knows by the sha256 of the token ids (its
# convert_hf_to_gguf.py, get_vocab_base_pre): the llama-architecture byte-level BPE families.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


def write_tensors(writer: Any, gguf: Any, arrays: Any, quant: str) -> dict[str, int]:
    """Add each (name, fp32 array) in `quant`, write the file and close it; the tensors per stored type."""
    counts: dict[str, int] = {}
    for name, array in arrays:
        data, raw_dtype = _tensor_data(gguf, array, quant)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        kind = raw_dtype.name if raw_dtype is not None else str(data.dtype)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _tensor_data(gguf: Any, array: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for add_tensor: 1-D tensors float32; others per `quant` (q8_0 needs rows that
    are a multiple of 32 values: other rows fall back to f16, as llama.cpp does)."""
    types = gguf.GGMLQuantizationType
    if array.ndim <= 1 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "f16" or (quant == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    qtype = types.BF16 if quant == "bf16" else types.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


@torch.no_grad()
def round_like_gguf(model: nn.Module, quant: str) -> None:
    """Give every weight of `model` the rounding `write_gguf` applies to it (quantize, dequantize), in
    place: the model then computes what the file holds, up to float arithmetic."""
    gguf = _gguf()
    for tensor in model.state_dict().values():
        array = tensor.detach().to("cpu", torch.float32).numpy()
        data, raw_dtype = _tensor_data(gguf, array, quant)
        if raw_dtype is not None:
            rounded = gguf.quants.dequantize(data, raw_dtype).reshape(array.shape)
        else:
            rounded = data.astype(np.float32)
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(rounded)).to(tensor.dtype))


def _file_type(gguf: Any, quant: str) -> int:
    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16,
            "q8_0": kinds.MOSTLY_Q8_0}[quant]


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) tokenizer, which GGUF "
            "export reads its vocabulary from. Write the merged transformers directory instead and convert "
            "it with llama.cpp's convert_hf_to_gguf.py."
        )
    return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("default" when it is not one it knows)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return KNOWN_PRE_TOKENIZERS.get(digest, "default")


def check_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """Refuse a tokenizer this writer does not convert (anything but byte-level BPE); its BPE model."""
    model = _tokenizer_json(tokenizer).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise GGUFExportError(
            f"the tokenizer is {kind}; tailor writes byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen, "
            "GPT-2 style) to GGUF. Write the adapter alone (--lora-only: it holds no vocabulary; run it on a "
            "base GGUF from llama.cpp's converter), or the merged transformers directory (tailor merge "
            "without --gguf) and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return model


def _add_tokenizer(gguf: Any, writer: Any, tokenizer: Any, vocab_size: int) -> str:
    model = check_tokenizer(tokenizer)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id, default=-1) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has token ids up to {max(by_id)} but the model only "
                              f"{vocab_size} embeddings; they belong to different models.")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding matrix is padded past the tokenizer (as llama.cpp pads)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer_name(tokenizer)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if merges:
        writer.add_token_merges(merges)
    special_ids = (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                   ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id))
    for attribute, add in special_ids:
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            add(value)
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    writer.add_add_bos_token(bool(adds_bos))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return pre


# ---------------------------------------------------------------------------------------------- model
def write_gguf(model: nn.Module, tokenizer: Any, path: str | Path, quant: str = "f16",
               extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Write `model` (a plain transformers model of an architecture in gguf_arch.ARCHITECTURES) and
    `tokenizer` to `path` as GGUF.

    `quant`: f32, f16, bf16 or q8_0 for the 2-D weights. `extra`: string key-values added to the file
    (tailor records the adapter and the export there). Returns what was written (tensor count, types).

    Raises:
        GGUFExportError: an architecture or RoPE scaling tailor does not write, a tokenizer other than
            byte-level BPE, an unknown quant, a tensor with no GGUF name.
    """
    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}.")
    config = model.config
    spec = architecture(config)
    gguf = _gguf()
    name_of = tensor_namer(spec, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = []  # (gguf name, hf name): every name is checked before the file is opened
    for hf_name in model.state_dict():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp and transformers reuse token_embd when the file has no output.weight
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_of(stem)
        if gguf_stem is None:
            if "rotary_emb" in hf_name:
                continue  # computed, not stored
            raise GGUFExportError(f"no GGUF name for tensor {hf_name!r} in llama.cpp's {arch_name(spec)} "
                                  "architecture: not a plain model of it.")
        tensors.append((f"{gguf_stem}.{suffix}", hf_name))

    writer = gguf.GGUFWriter(str(path), arch_name(spec))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(getattr(model, "name_or_path", "") or "merged"))
    write_metadata(writer, spec, config)
    writer.add_file_type(_file_type(gguf, quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _add_tokenizer(gguf, writer, tokenizer, config.vocab_size) if tokenizer is not None else None
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    state = model.state_dict()
    arrays = ((gguf_name, to_gguf_layout(spec, config, hf_name,
                                         state[hf_name].detach().to("cpu", torch.float32).numpy()))
              for gguf_name, hf_name in tensors)
    counts = write_tensors(writer, gguf, arrays, quant)
    return {"tensors": counts, "pre_tokenizer": pre, "quant": quant, "architecture": arch_name(spec)}


__all__ = ["GGUFExportError", "GGUF_TOLERANCE", "QUANT_TYPES", "check_exportable", "check_tokenizer",
           "pre_tokenizer_name",
           "round_like_gguf", "write_gguf"]
