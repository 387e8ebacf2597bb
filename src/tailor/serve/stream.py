"""The text stream: each request's new tokens become its text (detokenised as a whole, so that tokens
that only make sense together, such as the bytes of one character, come out right), cut at a stop
string, and handed to its listener in pieces; and the finish of a request, whatever ends it."""

from __future__ import annotations

import contextlib
import time

from tailor.serve.logprobs import TokenLogprob
from tailor.serve.request import Request
from tailor.serve.sampling import held_back, stop_position


class TextStream:
    """Turns chosen tokens into each request's text and finishes requests (engine thread only).

    Args:
        tokenizer: decodes the answers.
        stop_ids: token ids that end an answer (unless the request ignores eos).
        max_model_len: prompt + answer limit: a request that reaches it finishes with "length".
        stats: the engine's counters ("generated_tokens", "abort", "error").
    """

    def __init__(self, tokenizer, stop_ids: frozenset[int], max_model_len: int, stats: dict) -> None:
        self.tokenizer, self.stop_ids, self.stats = tokenizer, stop_ids, stats
        self.max_model_len = max_model_len

    def accept(self, requests: list[Request], tokens: list[int],
               logprobs: list[TokenLogprob | None] | None = None) -> None:
        """Append each request's next token (and its log-probability, for those that asked); finish those
        that stop. A request with max_tokens 0 (its prompt's log-probabilities only) finishes here."""
        now = time.perf_counter()
        for k, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if request.finished:
                continue
            params = request.params
            if params.max_tokens == 0:
                self.finish(request, "length")
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            request.generated += 1
            self.stats["generated_tokens"] += 1
            if (token in self.stop_ids and not params.ignore_eos) or token in params.stop_token_ids:
                self.finish(request, "stop")
                continue
            request.output_ids.append(token)
            if logprobs is not None and logprobs[k] is not None:
                request.logprobs.append(logprobs[k])
            if request.params.stop or request.on_update is not None:
                self._update_text(request)  # may finish it at a stop string
            full = len(request.prompt_ids) + len(request.output_ids) >= self.max_model_len
            if not request.finished and (len(request.output_ids) >= request.params.max_tokens or full):
                self.finish(request, "length")

    def _update_text(self, request: Request) -> None:
        before = len(request.text)
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        # stop strings are looked for once min_tokens are generated (vLLM)
        stops = request.params.stop if request.generated >= request.params.min_tokens else ()
        if stops:
            found = stop_position(text, stops, max(0, before - max(len(s) for s in stops)))
            if found is not None:
                request.text, request.cut = text[:found], True
                self.finish(request, "stop")
                return
        request.text = text
        if request.on_update is not None:
            end = len(text) - held_back(text, stops)
            if end > request.sent:
                delta, request.sent = text[request.sent : end], end
                request.on_update(request, delta)

    def finish(self, request: Request, reason: str) -> None:
        """End a request: its whole text, the rest of its stream, its listeners, `done` set (once)."""
        if request.finished:
            return
        if not request.cut:  # the whole answer (a stop string already cut the text where it began)
            request.text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        if reason in ("abort", "error"):
            self.stats[reason] = self.stats.get(reason, 0) + 1
        if request.on_update is not None:
            delta = request.text[request.sent :]
            request.sent = len(request.text)
            with contextlib.suppress(Exception):  # a listener's failure must not stop the engine
                request.on_update(request, delta)
        if request.on_finish is not None:
            with contextlib.suppress(Exception):
                request.on_finish(request)
        request.done.set()

    def fail(self, request: Request, error: Exception) -> None:
        request.error = error
        self.finish(request, "error")


__all__ = ["TextStream"]
