"""Tiny random models of each architecture tailor writes to GGUF, from the real transformers config
classes (their defaults: Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma's softcapping, sliding layers and
local RoPE base, Phi-3's fused qkv and gate_up), shrunk to 2 layers of width 64, with the default model's
tokenizer (byte-level BPE, 49152 tokens). Weights N(0, 0.2^2): wide enough logits that greedy decoding has
clear winners, so two implementations agree token for token."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from tailor.models.random import write_random_model

SHAPE = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=256),
    "gemma3_text": lambda: Gemma3TextConfig(**SHAPE, head_dim=16, query_pre_attn_scalar=16,
                                            sliding_window=256),
    "phi3": lambda: Phi3Config(**SHAPE),
}


def write_case(model_type: str, directory: Path) -> Path:
    """The tiny `model_type` model, written with the default tokenizer (and its chat template)."""
    return write_random_model(CONFIGS[model_type](), directory, dtype=torch.float32)
