"""The parts of a causal LM that training's loss and the serving engine both run apart: the transformer
body (hidden states) and the output head (hidden -> vocabulary logits); and how long a shared prompt
prefix must be before running it apart pays.

Both the loss (which runs the head only where labels carry loss) and the engine (which re-scores greedy
choices in fp32 from the hidden state) split the model the same way; this module is that one way.
"""

from __future__ import annotations

from torch import nn

# Tokens. Running a shared prefix in a forward of its own (training's second body call, serving's prefix
# forward) costs a launch of every layer; below this length that costs more than the rows it saves.
MIN_SHARED_PREFIX = 16


def transformer_body(model: nn.Module) -> nn.Module:
    """The part of an HF causal LM that returns hidden states (everything but the output head).

    Raises:
        TypeError: the model exposes no body (neither get_decoder() nor its base_model_prefix).
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            body = get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
        if body is not None and body is not model:
            return body
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise TypeError(
            f"{type(model).__name__} exposes no transformer body (get_decoder() or "
            f"`{prefix or 'base_model_prefix'}`); supervised_loss needs an HF causal LM."
        )
    return body


def output_head(model: nn.Module) -> nn.Module:
    """The output head (hidden -> vocabulary logits).

    Raises:
        TypeError: the model has none.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output head (get_output_embeddings() is None).")
    return head


__all__ = ["MIN_SHARED_PREFIX", "output_head", "transformer_body"]
