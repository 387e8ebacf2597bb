"""Choosing an adapter by content: the adapter whose description a prompt's embedding is closest to, or
the base model when the prompt lies outside every description.

Closeness is relative to each adapter's own spread: a prompt's score against an adapter is its distance
to the adapter's nearest centroid divided by the adapter's radius (the distance within which
RADIUS_QUANTILE of its own prompts lie). The adapter with the lowest score wins if that score is at most
`margin`; above it, nothing is close and the base model answers (a low-confidence fallback).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tailor.routing.describe import check_description

ROUTING_MARGIN = 1.25  # scores (distance / radius) up to this go to the adapter: measured in docs/serving.md


@dataclass(frozen=True)
class Described:
    """One adapter's description, ready to score against: (k, H) centroids, its radius and layer."""

    name: str
    centroids: torch.Tensor
    radius: float
    layer: int

    @classmethod
    def of(cls, name: str, description: dict[str, Any], source: str) -> Described:
        checked = check_description(description, source)
        return cls(name, torch.tensor(checked["centroids"], dtype=torch.float32), float(checked["radius"]),
                   int(checked["layer"]))


@dataclass(frozen=True)
class Choice:
    """Where a prompt goes: `adapter` (None: the base model), its score against the closest adapter
    (`closest`, None when no adapter was a candidate) and every candidate's score."""

    adapter: str | None
    closest: str | None
    score: float
    scores: dict[str, float]


def choose(embedding: torch.Tensor, candidates: Iterable[Described],
           margin: float = ROUTING_MARGIN) -> Choice:
    """The adapter for one (H,) prompt embedding among `candidates` (all described at its layer)."""
    scores = {}
    for described in candidates:
        if described.centroids.shape[-1] != embedding.shape[-1]:
            continue  # described on a model of another width: never close
        distance = torch.linalg.vector_norm(described.centroids - embedding.float()[None], dim=1).min()
        scores[described.name] = float(distance) / described.radius
    if not scores:
        return Choice(None, None, float("inf"), {})
    closest = min(scores, key=scores.__getitem__)
    score = scores[closest]
    return Choice(closest if score <= margin else None, closest, score, scores)


__all__ = ["ROUTING_MARGIN", "Choice", "Described", "choose"]
