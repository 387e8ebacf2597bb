"""An adapter's routing description: where its training prompts lie in the base model's embedding space.

    description = describe_prompts(model, tokenizer, prompts)   # `tailor train`, `tailor adapters describe`
    update_metadata(adapter_dir, routing=description)           # tailor_metadata.json, key "routing"

The description holds a few centroids (k-means, k <= MAX_CENTROIDS, over a sample of the prompts' pooled
hidden states, rounded to fp16 values), the radius that covers RADIUS_QUANTILE of its own prompts (distance
to the nearest centroid), the layer and pooling, and the base model's fingerprint. A request's prompt is
close to an adapter when its distance to the nearest centroid is within the radius times the margin the
router uses (`tailor.routing.router`): the description alone decides "nothing is close", without knowing
the other adapters.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tailor.routing.embed import content_tokens, pooled_states, template_frame

ROUTING_FORMAT = 1
ROUTING_LAYER = 0  # token embeddings: measured in docs/serving.md (benchmarks/routing.py)
ROUTING_POOLING = "mean"
MAX_CENTROIDS = 4
SAMPLE_PROMPTS = 128  # training prompts a description is made from
MIN_PROMPTS = 8
RADIUS_QUANTILE = 0.95


class RoutingDescriptionError(ValueError):
    """A routing description that cannot be made or read (names the adapter or file and the fix)."""


def prompt_ids(tokenizer: Any, prompt: list[dict[str, str]] | str) -> list[int]:
    """A prompt's tokens as serving sees them: a chat prompt rendered with the chat template up to the
    assistant's turn (what /v1/chat/completions encodes), a plain text prompt as /v1/completions does.
    (What is pooled leaves out the template's frame: `tailor.routing.embed.content_tokens`.)"""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    from tailor.data.tokenize import render_chat

    text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def example_prompts(examples: Sequence[Any]) -> list[list[dict[str, str]] | str]:
    """The prompts of training examples (tailor.data.Example: a conversation up to its last assistant
    turn; a plain-text example has no prompt and is left out) or preference pairs (their shared prompt)."""
    return [e.prompt for e in examples if getattr(e, "messages", True) is not None and e.prompt]


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """(k, H) centroids of (n, H) points: k-means++ seeding, then Lloyd's iterations (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(points), (1,), generator=generator))
    centroids = points[first : first + 1]
    while len(centroids) < k:  # k-means++: the next seed drawn by squared distance to the nearest one
        nearest = torch.cdist(points, centroids).min(dim=1).values ** 2  # (n,)
        if float(nearest.sum()) == 0:
            break
        chosen = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator))
        centroids = torch.cat([centroids, points[chosen : chosen + 1]])
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(dim=1)  # (n,)
        moved = torch.stack([points[assign == c].mean(0) if bool((assign == c).any()) else centroids[c]
                             for c in range(len(centroids))])
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


def nearest_distance(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n,) each point's Euclidean distance to its nearest centroid."""
    return torch.cdist(points.float(), centroids.float()).min(dim=1).values


def describe_embeddings(points: torch.Tensor, layer: int, pooling: str = ROUTING_POOLING,
                        base: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """The description of (n, H) pooled prompt embeddings (n >= MIN_PROMPTS)."""
    if len(points) < MIN_PROMPTS:
        raise RoutingDescriptionError(f"{len(points)} prompts are too few to describe an adapter: give at "
                                      f"least {MIN_PROMPTS} (best {SAMPLE_PROMPTS}).")
    k = max(1, min(MAX_CENTROIDS, len(points) // 16))
    centroids = kmeans(points.float(), k, seed).half().float()  # as stored: fp16 values
    radius = float(torch.quantile(nearest_distance(points, centroids), RADIUS_QUANTILE))
    return {"format": ROUTING_FORMAT, "layer": layer, "pooling": pooling, "prompts": len(points),
            "centroids": centroids.tolist(), "radius": radius, "radius_quantile": RADIUS_QUANTILE,
            "base": base}


def describe_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[list[dict[str, str]] | str],
                     layer: int = ROUTING_LAYER, sample: int = SAMPLE_PROMPTS,
                     seed: int = 0) -> dict[str, Any]:
    """The routing description of an adapter trained on `prompts` (a sample of `sample` of them), from the
    base model under `model` (adapters switched off)."""
    from tailor.adapters.metadata import base_fingerprint

    chosen = list(prompts)
    if len(chosen) > sample:
        chosen = random.Random(seed).sample(chosen, sample)
    frame = template_frame(tokenizer)
    ids = [content_tokens(prompt_ids(tokenizer, p), frame) for p in chosen]
    points = pooled_states(model, [p for p in ids if p], layer)
    return describe_embeddings(points, layer, base=base_fingerprint(model), seed=seed)


def describe_training(model: nn.Module, tokenizer: Any, examples: Sequence[Any]) -> dict[str, Any] | None:
    """The description of an adapter trained on `examples` (replayed base answers left out: they are
    general prompts, the base model's to answer), or None when they hold fewer than MIN_PROMPTS prompts
    (plain-text data has none)."""
    from tailor.data.example import replay_index

    prompts = example_prompts([e for e in examples if replay_index(e.source) < 0])
    if len(prompts) < MIN_PROMPTS:
        return None
    return describe_prompts(model, tokenizer, prompts)


def check_description(description: Any, source: str) -> dict[str, Any]:
    """A stored description, checked (RoutingDescriptionError naming `source` and the bad field)."""
    fix = "describe the adapter again (tailor adapters describe NAME --examples FILE)"
    if not isinstance(description, dict):
        raise RoutingDescriptionError(f"{source}: 'routing' must be a JSON object; {fix}.")
    problems = []
    centroids = description.get("centroids")
    if not (isinstance(centroids, list) and centroids and all(isinstance(c, list) and c for c in centroids)
            and len({len(c) for c in centroids}) == 1):
        problems.append("'centroids' must be a non-empty list of equally long lists of numbers")
    radius = description.get("radius")
    if not isinstance(radius, int | float) or not radius > 0:
        problems.append(f"'radius' must be a number above 0 (is {radius!r})")
    if not isinstance(description.get("layer"), int) or description["layer"] < 0:
        problems.append(f"'layer' must be an integer >= 0 (is {description.get('layer')!r})")
    if description.get("pooling") not in ("mean",):
        problems.append(f"'pooling' must be 'mean' (is {description.get('pooling')!r})")
    if problems:
        raise RoutingDescriptionError(f"{source}: routing description: {'; '.join(problems)}; {fix}.")
    return description


__all__ = [
    "MAX_CENTROIDS", "RADIUS_QUANTILE", "ROUTING_LAYER", "ROUTING_POOLING", "RoutingDescriptionError",
    "SAMPLE_PROMPTS", "check_description", "describe_embeddings", "describe_prompts", "describe_training",
    "example_prompts",
    "kmeans", "nearest_distance", "prompt_ids",
]
