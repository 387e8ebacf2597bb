"""What llama.cpp needs to know about each architecture tailor writes to GGUF: its name there, its
hyper-parameter keys, and how a Hugging Face tensor becomes a GGUF one.

Read from llama.cpp's converter (convert_hf_to_gguf.py and its `conversion/` classes: LlamaModel,
Qwen2Model, Qwen3Model, Gemma2Model, Gemma3Model, Phi3MiniModel) and its loaders (src/models/*.cpp).
Tensor names come from gguf-py's own table (`gguf.get_tensor_name_map`), the one the converter uses.
Per architecture, three things differ:

- ``rope_permute`` (llama, mistral): the rows of q and k go from Hugging Face's rotary layout (the two
  halves of each head) to GGML's interleaved pairs; the others run NEOX-style rotary on HF's layout.
- ``norm_shift`` (gemma2, gemma3): HF's Gemma RMSNorm multiplies by ``1 + w``; llama.cpp by ``w``, so the
  file stores ``w + 1`` (q/k norms included).
- the hyper-parameters (`_metadata`): softcapping and sliding windows (gemma), local rope base (gemma3),
  the original context (phi3), as the converter writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF here; the message says why and what to do."""


@dataclass(frozen=True)
class GGUFArchitecture:
    """One transformers model_type as llama.cpp runs it."""

    model_type: str  # transformers' config.model_type
    arch: str  # gguf.MODEL_ARCH member (llama.cpp's name for it, lower-cased, is general.architecture)
    rope_permute: bool = False  # q/k rows permuted to GGML's rotary layout (LlamaModel.permute)
    norm_shift: float = 0.0  # added to every RMSNorm weight (Gemma's 1 + w)


ARCHITECTURES = {spec.model_type: spec for spec in (
    GGUFArchitecture("llama", "LLAMA", rope_permute=True),
    GGUFArchitecture("mistral", "LLAMA", rope_permute=True),  # llama.cpp runs Mistral as llama
    GGUFArchitecture("qwen2", "QWEN2"),
    GGUFArchitecture("qwen3", "QWEN3"),
    GGUFArchitecture("gemma2", "GEMMA2", norm_shift=1.0),
    GGUFArchitecture("gemma3_text", "GEMMA3", norm_shift=1.0),
    GGUFArchitecture("phi3", "PHI3"),
)}
# rope types llama.cpp reads from the plain hyper-parameters (linear: rope.scaling.factor)
SUPPORTED_ROPE = (None, "default", "linear")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of tailor
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _rope(config: Any) -> dict[str, Any]:
    """The full-attention layers' rope parameters (transformers 5 keys them by layer type for Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {}
    return rope.get("full_attention", rope)


def _convert_hint() -> str:
    return ("Write the merged transformers directory instead (tailor merge without --gguf) and convert it "
            "with llama.cpp's convert_hf_to_gguf.py.")


def architecture(config: Any) -> GGUFArchitecture:
    """The GGUF description of `config`'s model, after refusing what tailor does not write faithfully.

    Raises:
        GGUFExportError: an architecture not in `ARCHITECTURES`, a mixture-of-experts model, RoPE scaling
            other than linear, a Gemma attention scale llama.cpp does not use.
    """
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise GGUFExportError(
            f"GGUF export supports model_type {', '.join(repr(t) for t in ARCHITECTURES)} (SmolLM2, Llama, "
            f"Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3); this model is {model_type!r}. {_convert_hint()}")
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in SUPPORTED_ROPE:
        raise GGUFExportError(
            f"this model scales its rotary embedding ({rope_type!r}); tailor writes default and linear "
            f"RoPE only. {_convert_hint()}")
    if spec.arch.startswith("GEMMA"):
        head_dim = config.head_dim
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models
        if scalar not in (head_dim, config.hidden_size // config.num_attention_heads):
            raise GGUFExportError(
                f"query_pre_attn_scalar={scalar} is neither head_dim ({head_dim}) nor hidden_size / "
                f"num_attention_heads: llama.cpp would scale attention differently. {_convert_hint()}")
    return spec


def check_exportable(config: Any) -> None:
    """Refuse, before any work, a model this writer does not convert faithfully."""
    architecture(config)


def arch_name(spec: GGUFArchitecture) -> str:
    """general.architecture: llama.cpp's name for the architecture ("llama", "qwen2", "gemma3", ...)."""
    gguf = _gguf()
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)]


def tensor_namer(spec: GGUFArchitecture, n_layers: int) -> Callable[[str], str | None]:
    """HF module path ("model.layers.0.self_attn.q_proj") -> GGUF stem ("blk.0.attn_q"), or None."""
    gguf = _gguf()
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), n_layers)
    return table.get_name


def heads_of(config: Any, module_path: str) -> int | None:
    """How many heads' rows `module_path` holds, where its rows are permuted (q: n_head, k: n_kv_head)."""
    if module_path.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if module_path.endswith("self_attn.k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> GGML's, per head: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...) (llama.cpp's
    LlamaModel.permute). Works on weights, biases and a LoRA B (the rows are the output features)."""
    n_rows = rows.shape[0]
    return (rows.reshape(n_head, 2, n_rows // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def to_gguf_layout(spec: GGUFArchitecture, config: Any, hf_name: str, array: np.ndarray) -> np.ndarray:
    """A model tensor (fp32) as llama.cpp reads it: q/k rows permuted, Gemma norms shifted."""
    stem = hf_name.rpartition(".")[0]
    n_head = heads_of(config, stem) if spec.rope_permute else None
    if n_head is not None:
        array = permute_rows(array, n_head)
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        array = array + np.float32(spec.norm_shift)
    return array


def write_metadata(writer: Any, spec: GGUFArchitecture, config: Any) -> None:
    """The hyper-parameters llama.cpp's loader reads for `spec`, as convert_hf_to_gguf.py writes them."""
    gguf = _gguf()
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if spec.arch == "LLAMA":
        writer.add_vocab_size(config.vocab_size)
    if spec.arch.startswith("GEMMA"):
        _gemma_metadata(writer, spec, config)
    if spec.arch == "PHI3":
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: no window (Phi-4)


def _gemma_metadata(writer: Any, spec: GGUFArchitecture, config: Any) -> None:
    if spec.arch == "GEMMA2" and getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # which layers slide, as transformers runs them (llama.cpp's default is every 2nd / 6th)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}).get("rope_theta") if isinstance(rope, dict) else None
    if local is not None:
        writer.add_rope_freq_base_swa(float(local))


__all__ = ["ARCHITECTURES", "GGUFArchitecture", "GGUFExportError", "arch_name", "architecture",
           "check_exportable", "heads_of", "permute_rows", "tensor_namer", "to_gguf_layout", "write_metadata"]
