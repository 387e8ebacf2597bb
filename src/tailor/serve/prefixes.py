"""The prefix cache: keys and values of prompt prefixes, shared by requests that start the same way.

Requests with the same adapter whose prompts start with the same tokens (a system prompt, a task
instruction) copy the prefix's keys/values into their rows instead of computing them: a stored prefix
when one matches, else one computed once for the joiners of a step that share it. Keyed by the adapter
reference as well: a prefix's keys/values depend on the adapter that computed them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tailor.models.parts import MIN_SHARED_PREFIX
from tailor.serve.adapters import AdapterRef
from tailor.serve.request import Request

MAX_PREFIXES = 32  # prefixes kept (keys/values of every layer), least recently used out first


@dataclass
class Prefix:
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (heads, P, dim)


# computes a prefix's keys/values (the request gives the adapter): the engine runs it in a spare row
ComputePrefix = Callable[[Request, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]]


class PrefixCache:
    """Stored prefixes by (adapter reference, tokens), least recently used out first (engine thread)."""

    def __init__(self, enabled: bool = True, max_prefixes: int = MAX_PREFIXES) -> None:
        self.enabled, self.max_prefixes = enabled, max_prefixes
        self.prefixes: OrderedDict[tuple[AdapterRef | None, tuple[int, ...]], Prefix] = OrderedDict()

    def find(self, joiners: list[Request], compute: ComputePrefix) -> list[Prefix | None]:
        """The stored prefix each joiner starts with (same adapter), after storing new ones that several
        joiners share (`compute` runs them)."""
        if not self.enabled:
            return [None] * len(joiners)
        found = [None if wants_prompt_logits(r) else self._stored(r) for r in joiners]
        groups: dict[AdapterRef | None, list[int]] = {}
        for i, request in enumerate(joiners):
            if found[i] is None and not wants_prompt_logits(request):
                groups.setdefault(request.ref, []).append(i)
        for key, members in groups.items():
            if len(members) < 2:
                continue
            prompts = [joiners[i].prompt_ids for i in members]
            length = common_prefix_length(prompts)
            length = min(length, min(len(p) for p in prompts) - 1)  # keep one token to compute per row
            if length < MIN_SHARED_PREFIX:
                continue
            tokens = tuple(prompts[0][:length])
            prefix = Prefix(tokens, compute(joiners[members[0]], tokens))
            self.prefixes[(key, tokens)] = prefix
            while len(self.prefixes) > self.max_prefixes:
                self.prefixes.popitem(last=False)
            for i in members:
                found[i] = prefix
        return found

    def _stored(self, request: Request) -> Prefix | None:
        key = request.ref
        best = None
        for (adapter_key, tokens), prefix in self.prefixes.items():
            if adapter_key == key and len(tokens) < len(request.prompt_ids) \
                    and (best is None or len(tokens) > len(best.tokens)) \
                    and tuple(request.prompt_ids[: len(tokens)]) == tokens:
                best = prefix
        if best is not None:
            self.prefixes.move_to_end((key, best.tokens))
        return best


def wants_prompt_logits(request: Request) -> bool:
    """Whether the request reports its prompt's log-probabilities (echo): then every prompt token is
    computed in its own prefill, none copied from a stored prefix."""
    return request.params.prompt_logprobs is not None


def common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


__all__ = ["MAX_PREFIXES", "Prefix", "PrefixCache", "common_prefix_length", "wants_prompt_logits"]
