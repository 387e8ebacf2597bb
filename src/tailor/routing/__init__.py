"""Routing by content: describe what an adapter was trained on (where its training prompts lie in the base
model's embedding space) and send a request to the adapter its prompt resembles, or to the base model.

    description = describe_prompts(model, tokenizer, prompts)     # -> tailor_metadata.json "routing"
    choice = choose(pooled_states(model, [ids], layer)[0], [Described.of(name, description, source)])
"""

from tailor.routing.describe import (
    ROUTING_LAYER,
    RoutingDescriptionError,
    check_description,
    describe_embeddings,
    describe_prompts,
    example_prompts,
    prompt_ids,
)
from tailor.routing.embed import pooled_states
from tailor.routing.router import ROUTING_MARGIN, Choice, Described, choose

__all__ = [
    "ROUTING_LAYER", "ROUTING_MARGIN", "Choice", "Described", "RoutingDescriptionError", "check_description",
    "choose", "describe_embeddings", "describe_prompts", "example_prompts", "pooled_states", "prompt_ids",
]
