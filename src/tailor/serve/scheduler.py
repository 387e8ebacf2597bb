"""The scheduler: the queue of waiting requests and which of them join the running batch at a step.

A request joins when a row is free, its prompt fits the step's prefill budget (a long queue is prefilled
over several steps, so running requests keep their pace) and its adapter is in a slot. An adapter that
is not yet in host memory loads in the background meanwhile: the request is passed over (later requests
may go first) and never stalls the batch.
"""

from __future__ import annotations

import threading
from collections import deque

from tailor.serve.adapters import EngineAdapters
from tailor.serve.request import Request


class Scheduler:
    """Waiting requests, in arrival order (`add` and `abort` from any thread; the rest engine thread).

    Args:
        adapters: per-row adapters (None: only base-model requests).
        max_batch: rows of the running batch.
        prefill_tokens: prompt tokens admitted per step while other rows decode.
    """

    def __init__(self, adapters: EngineAdapters | None, max_batch: int, prefill_tokens: int) -> None:
        self.adapters, self.max_batch, self.prefill_tokens = adapters, max_batch, prefill_tokens
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()

    def add(self, request: Request) -> None:
        with self._lock:
            self.waiting.append(request)

    def take_aborted(self) -> list[Request]:
        """Remove and return the waiting requests that were aborted."""
        with self._lock:
            aborted = [r for r in self.waiting if r.aborted]
            for request in aborted:
                self.waiting.remove(request)
        return aborted

    def take_all(self) -> list[Request]:
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        return waiting

    def admit(self, free: int, decoding: bool) -> tuple[list[Request], list[tuple[Request, Exception]]]:
        """(the requests that join the batch now, each with its adapter slot pinned, in order; the
        requests whose adapter failed to load, with the error), both taken off the queue.

        Args:
            free: free rows of the batch.
            decoding: other rows run (the prefill budget then holds; else one long prompt may exceed it).
        """
        joiners: list[Request] = []
        failed: list[tuple[Request, Exception]] = []
        if free <= 0:
            return joiners, failed
        budget = self.prefill_tokens if decoding else max(self.prefill_tokens, 1)
        with self._lock:
            candidates = list(self.waiting)
        used = 0
        adapters = self.adapters
        loading: set = set()  # adapters not ready; past a few, later requests wait their turn to load
        for request in candidates[: 4 * self.max_batch]:
            if len(joiners) == free or (joiners and used + len(request.prompt_ids) > budget):
                break
            ref = request.ref
            if ref is not None:
                if ref in loading or len(loading) >= adapters.max_cpu_loras:
                    continue
                failure = adapters.failure(ref)
                if failure is not None:
                    with self._lock:
                        self.waiting.remove(request)
                    failed.append((request, failure))
                    continue
                slot = adapters.acquire(ref)
                if slot is None:
                    loading.add(ref)
                    continue  # loading (or all slots busy): later requests may go first
                request.slot = slot
            with self._lock:
                self.waiting.remove(request)
            joiners.append(request)
            used += len(request.prompt_ids)
        return joiners, failed


__all__ = ["Scheduler"]
