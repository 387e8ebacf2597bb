"""Greedy generation for conversations, batched with left padding."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tailor.data.tokenize import render_chat

CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the eos ids of the tokenizer and of the generation config, and the
    chat end-of-turn token when the vocabulary has one (ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...)."""
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (tokenizer.eos_token_id, generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in CHAT_END_TOKENS if token in vocab)
    return sorted(ids)


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of `conversations`, in order, decoded without special tokens and stripped.

    Each conversation is rendered with the chat template and the assistant prompt appended
    (add_generation_prompt=True). Prompts are sorted by length and batched with left padding, so every
    row's last prompt token sits at the same position and new tokens line up; a row stops at eos or the
    chat end-of-turn token.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be >= 1.")
    prompts = [render_chat(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    # Keep any right-padding default of the tokenizer (training uses it); left-pad only here.
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]), reverse=True)
    stops = set(stop_token_ids(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    completions: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
            for row, i in enumerate(rows):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=sorted(stops),
                pad_token_id=pad_id,
            )  # [B, T + new]
            for row, i in enumerate(rows):
                new_tokens = output[row, width:].tolist()
                # Cut at the first stop token: what follows is padding of a row that finished early.
                end = next((k for k, token in enumerate(new_tokens) if token in stops), len(new_tokens))
                completions[i] = tokenizer.decode(new_tokens[:end], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return completions
