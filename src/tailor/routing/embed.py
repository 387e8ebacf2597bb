"""A prompt's embedding for routing: the base model's hidden states after its first `layer` decoder layers,
mean-pooled over the prompt's tokens (layer 0: the token embeddings themselves).

The pass stops after the layer it needs (a forward hook ends it), so embedding at layer k costs k/L of a
base prefill; layer 0 costs an embedding lookup, the first step of the pass the engine makes anyway.
Any adapter on the model is switched off for the pass: a description is the base model's view of prompts,
so that every adapter on one base is described, and every request embedded, in the same space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

POOLINGS = ("mean",)
_SENTINEL = "\u2063routing\u2063"  # a user message's text that no template contains


def template_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(the tokens a chat template puts before a lone user message, those after it, up to the assistant's
    turn): the frame every chat prompt shares, left out of the pooling so that a short question is not
    mostly template (its default system prompt included). ([], []) without a chat template."""
    from tailor.data.tokenize import render_chat

    try:
        text = render_chat(tokenizer, [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
    except Exception:  # no usable template: plain prompts only
        return [], []
    before, _, after = text.partition(_SENTINEL)
    encode = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []  # noqa: E731
    return encode(before), encode(after)


def content_tokens(ids: Sequence[int], frame: tuple[list[int], list[int]]) -> list[int]:
    """`ids` without the longest prefix shared with the frame's head and suffix shared with its tail (all
    of `ids` if nothing would be left)."""
    head, tail = frame
    start = 0
    while start < min(len(ids), len(head)) and ids[start] == head[start]:
        start += 1
    end = len(ids)
    while end > start and len(ids) - end < len(tail) and ids[end - 1] == tail[end - 1 - len(ids) + len(tail)]:
        end -= 1
    return list(ids[start:end]) or list(ids)


class _Reached(Exception):
    """Raised by the hook once the wanted layer ran: the rest of the forward is not needed."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (Llama/Qwen/Mistral/GPT-2 layouts)."""
    from tailor.models.parts import transformer_body

    body = transformer_body(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"{type(model).__name__}: no list of decoder layers found (layers, h or blocks).")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


@contextlib.contextmanager
def _base_only(model: nn.Module) -> Iterator[None]:
    """Every tailor adapter on the model switched off (named adapters and serving slots alike)."""
    from tailor.lora import disable_adapters

    with disable_adapters(model):
        yield


@torch.inference_mode()
def pooled_states(model: nn.Module, prompts: Sequence[Sequence[int]], layer: int,
                  batch_size: int = 16) -> torch.Tensor:
    """(n, H) float32: each prompt's hidden states after `layer` decoder layers, mean over its tokens.

    Args:
        model: a transformers causal LM (its adapters are switched off for the pass).
        prompts: token ids, one list per prompt (each non-empty).
        layer: 0 (token embeddings) .. the number of decoder layers.
    """
    layers = decoder_layers(model)
    if not 0 <= layer <= len(layers):
        raise ValueError(f"layer {layer} is not one of this model's 0..{len(layers)} (0: token embeddings).")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be embedded: give at least one token.")
    device = next(model.parameters()).device
    weight = base_embedding_table(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T), right padded
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = True
        ids, mask = ids.to(device), mask.to(device)
        if layer == 0:
            hidden = nn.functional.embedding(ids, weight)  # (B, T, H): no pass at all
        else:
            hidden = _hidden_after(model, layers[layer - 1], ids, mask)
        weights = mask[:, :, None].to(torch.float32)  # (B, T, 1)
        out.append((hidden.float() * weights).sum(1) / weights.sum(1))  # (B, H)
    return torch.cat(out).cpu()


def base_embedding_table(model: nn.Module) -> torch.Tensor:
    """(V, H) the base model's token embedding table, behind a LoRA or modules_to_save wrapper."""
    embeddings = model.get_input_embeddings()
    for inner in ("base_layer", "original_module"):  # tailor.lora's wrappers keep the base table there
        embeddings = getattr(embeddings, inner, embeddings)
    return embeddings.weight


def _hidden_after(model: nn.Module, last: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H): the output of decoder layer `last`, the forward stopped there."""

    def stop(module, args, output):
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = last.register_forward_hook(stop)
    try:
        with _base_only(model):
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    except _Reached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError("the forward pass never reached the routing layer.")  # pragma: no cover


__all__ = ["POOLINGS", "base_embedding_table", "content_tokens", "decoder_layers", "num_layers",
           "pooled_states",
           "template_frame"]
