"""Write a (merged) llama-architecture transformers model as one GGUF file, with the `gguf` package.

Tensor names come from gguf-py's own name map for the llama architecture (`get_tensor_name_map`, the
table llama.cpp's convert_hf_to_gguf.py uses and transformers' GGUF loader reads back): ``token_embd``,
``blk.N.attn_q`` ... ``output_norm``, ``output``. As in llama.cpp's converter, the rows of the query and
key projections are permuted from Hugging Face's rotary layout (the two halves of each head) to GGML's
(interleaved pairs); transformers undoes it on load. 1-D tensors (norms, biases) stay float32, as
llama.cpp writes them.

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


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF here; the message says why and what to do."""


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of tailor
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def check_exportable(config: Any) -> None:
    """Refuse, before any work, a model this writer does not convert faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GGUFExportError(
            f"GGUF export supports llama-architecture models (model_type 'llama': SmolLM2, Llama 2/3, "
            f"TinyLlama, ...); this model is {model_type!r}. Write the merged transformers directory instead "
            "(tailor merge without --gguf) and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise GGUFExportError(
            f"this model scales its rotary embedding ({rope_type!r}); tailor's GGUF writer does not write "
            "RoPE scaling. Write the merged transformers directory (tailor merge without --gguf) and convert "
            "it with llama.cpp's convert_hf_to_gguf.py."
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> GGML's, per head: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...) (llama.cpp's
    LlamaModel.permute). Rows of q (n_head heads) or k (n_kv_head heads); works on biases too."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


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


def _add_tokenizer(gguf: Any, writer: Any, tokenizer: Any, vocab_size: int) -> str:
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise GGUFExportError(
            f"the tokenizer is {kind}; tailor writes byte-level BPE vocabularies (SmolLM2, Llama 3, GPT-2 "
            "style) to GGUF. Write the merged transformers directory instead (tailor merge without --gguf) "
            "and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
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
    """Write `model` (a plain llama-architecture transformers model) and `tokenizer` to `path` as GGUF.

    `quant`: f32, f16, bf16 or q8_0 for the 2-D weights. `extra`: string key-values added to the file
    (tailor records the adapter and the export there). Returns what was written (tensor count, types).

    Raises:
        GGUFExportError: not a llama model, RoPE scaling, a tokenizer other than byte-level BPE, an
            unknown quant.
    """
    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}.")
    config = model.config
    check_exportable(config)
    gguf = _gguf()
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(str(getattr(model, "name_or_path", "") or "merged"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf, quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _add_tokenizer(gguf, writer, tokenizer, config.vocab_size) if tokenizer is not None else None
    for key, value in (extra or {}).items():
        writer.add_string(key, value)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp and transformers reuse token_embd when the file has no output.weight
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is None:
            if "rotary_emb" in hf_name:
                continue  # computed, not stored
            raise GGUFExportError(f"no GGUF name for tensor {hf_name!r}: not a plain llama model.")
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if stem.endswith("self_attn.q_proj"):
            array = _permute(array, n_head)
        elif stem.endswith("self_attn.k_proj"):
            array = _permute(array, n_kv)
        data, raw_dtype = _tensor_data(gguf, array, quant)
        writer.add_tensor(f"{gguf_stem}.{suffix}", data, raw_dtype=raw_dtype)
        kind = raw_dtype.name if raw_dtype is not None else str(data.dtype)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": counts, "pre_tokenizer": pre, "quant": quant}


__all__ = ["GGUFExportError", "GGUF_TOLERANCE", "QUANT_TYPES", "check_exportable", "pre_tokenizer_name",
           "round_like_gguf", "write_gguf"]
