"""One generation request as the engine carries it: what was asked, and, as it runs, its result."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tailor.serve.adapters import AdapterRef
from tailor.serve.constraints import RowConstraint
from tailor.serve.logprobs import TokenLogprob
from tailor.serve.sampling import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its result.

    `adapter` names the adapter (None: the bare base model); `Engine.submit` resolves a name once into
    the `AdapterRef` it then carries (a caller that resolved it already passes the reference).

    `on_update(request, delta)` (optional, for streaming) is called from the engine's thread with each
    new piece of text (deltas hold back what may begin a stop string), and once more when the request
    finishes; `on_finish(request)` (optional) once, when it finishes (`finish_reason` set: "stop",
    "length", "abort", or "error" with `error`). Neither may block.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | AdapterRef | None = None
    on_update: Callable[[Request, str], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)  # the answer (a final stop token left out)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of output_ids (params.logprobs set)
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt_ids (params.prompt_logprobs set)
    generated: int = 0  # tokens generated, a final stop token included (usage.completion_tokens)
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    # engine state
    slot: int = -1  # the adapter slot its rows use (-1: none)
    generator: torch.Generator | None = None
    sent: int = 0  # characters of text already passed to on_update
    done: threading.Event = field(default_factory=threading.Event)
    constraint: RowConstraint | None = None  # structured output: the grammar its tokens must follow
    aborted: bool = False  # asked to stop (`Engine.abort`); finished at the next step
    cut: bool = False  # text was cut at a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ref(self) -> AdapterRef | None:
        """The resolved adapter (set by `Engine.submit`), or None for the base model."""
        return self.adapter if isinstance(self.adapter, AdapterRef) else None

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if isinstance(self.adapter, AdapterRef) else self.adapter


__all__ = ["Request"]
