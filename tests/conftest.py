"""Shared fixtures: tiny randomly initialised transformers models built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import json
import socket
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tailor.data import TokenizedExample
from tailor.plan.catalogue import Architecture

VOCAB = 128

# a tiny Llama shape for the planner's tests (tailor.plan counts it; the tests build it with transformers)
TINY_PLAN_ARCH = Architecture(
    name="tiny",
    model_type="llama",
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=344,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    tie_embeddings=False,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_mixtral(seed: int = 0, **overrides):
    """A tiny Mixtral: experts as 3-D parameters (transformers 5), 4 experts, top-2, 2 layers."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        **overrides,
    )
    return MixtralForCausalLM(config).eval()


def tiny_qwen3_moe(seed: int = 0, **overrides):
    """A tiny Qwen3-MoE: 4 experts of moe_intermediate_size 24, top-2, 2 layers, head_dim 8."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, **overrides,
    )
    return Qwen3MoeForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than it buys (and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model_name(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.randint(0, VOCAB, (2, 12))


# ------------------------------------------------------------------------------------------------------
# Chat tokenizers and tiny chat models saved to disk (used by the eval, model, train and CLI tests)
# ------------------------------------------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    'Where is my order ORD-12345? {"intent":"order_status","order_id":"ORD-12345","urgency":"high"}',
    "What is the capital of France? The capital of France is Paris. hello world, thanks a lot!",
    'I want a refund for my kettle. {"intent":"refund","order_id":null,"product":"kettle"}',
]

CHAR_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def chat_tokenizer(eos: str = "<|im_end|>", im_end_special: bool = True) -> PreTrainedTokenizerFast:
    """A small real byte-level BPE tokenizer (trained here in milliseconds) with a ChatML template.

    im_end_special=False adds <|im_end|> as an ordinary token (decoding keeps it as text).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = CHAT_SPECIALS if im_end_special else CHAT_SPECIALS[:2]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    if not im_end_special:
        tokenizer.add_tokens([AddedToken("<|im_end|>", special=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, bos_token="<|im_start|>",
        chat_template=CHATML,
    )


def tiny_chat_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """A real uvicorn server for `app` in this process (its own thread) on a free loopback port: its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_model_dir(path: Path, seed: int = 0, builder=None) -> Path:
    """A tiny random Llama (or `builder`'s model) + a character tokenizer (ids < VOCAB) with ChatML, saved
    as an HF dir."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(CHAR_SPECIALS + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters join back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", additional_special_tokens=CHAR_SPECIALS[1:])
    tokenizer.chat_template = CHATML
    end = vocab["<|im_end|>"]
    model = (builder or tiny_llama)(seed, bos_token_id=None, eos_token_id=end, pad_token_id=end)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_arithmetic_jsonl(path: Path, n: int = 48, offset: int = 0) -> Path:
    """Chat examples 'add a b' -> 'a+b': a learnable task with a short answer."""
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 10, (i * 7) % 10
        rows.append({"messages": [{"role": "user", "content": f"add {a} {b}"},
                                  {"role": "assistant", "content": str(a + b)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prefixed_batch(prefix: int = 20, rows: int = 4, width: int = 30, seed: int = 0) -> dict:
    """Right-padded rows that share their first `prefix` tokens (one system prompt), with labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    input_ids[:, :prefix] = input_ids[0, :prefix]  # e.g. the same system prompt in every row
    input_ids[1:, prefix] = (input_ids[0, prefix] + torch.arange(1, rows)) % VOCAB  # then differ
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, width - 6:] = 0
    attention_mask[2, width - 3:] = 0
    labels = input_ids.clone()
    labels[:, : prefix + 2] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def synthetic_examples(n: int = 24, seed: int = 0) -> list[TokenizedExample]:
    """Prompt tokens (no loss) then an answer that is a fixed function of the prompt (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        prompt_len = 3 + i % 5
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=generator).tolist()
        answer = [(t * 7 + 3) % (VOCAB - 1) + 1 for t in prompt[:3]]
        examples.append(TokenizedExample(prompt + answer, [-100] * prompt_len + answer, f"synthetic:{i}"))
    return examples


def save_state(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "w.safetensors"))


def save_tiny_run(root: Path) -> None:
    """A tiny chat model (root/model, with its tokenizer) and a nonzero LoRA adapter for it
    (root/run/adapter): what the evaluation command-line tests evaluate."""
    from tailor.adapters import save_adapter
    from tailor.lora import LoraConfig, add_lora

    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=4)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    add_lora(model, LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, root / "run" / "adapter")
