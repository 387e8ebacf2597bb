"""The one formatter of answers: OpenAI's completion and chat completion shapes, whole or streamed.

The two shapes differ in three places only (the objects' names, a choice's text as ``text`` or as an
assistant ``message``/``delta``, and chat's opening chunk that names the role); they are all here, so the
generation path (`tailor.serve.openai_api`) never asks which endpoint it serves. Log-probabilities, when
asked for, are written in the endpoint's shape by `tailor.serve.logprobs.LogprobsWriter`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from tailor.serve.logprobs import LogprobsWriter, TokenLogprob
from tailor.serve.request import Request


class ResponseFormat:
    """How one response is written (`chat`: chat completions, else completions) for the adapter or base
    model name that served it."""

    def __init__(self, chat: bool, served: str, logprobs: LogprobsWriter | None = None) -> None:
        self.chat, self.served, self.logprobs = chat, served, logprobs
        self._offsets: dict[int, int] = {}  # each streamed choice's text_offset so far
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    # --- whole answers -------------------------------------------------------------------------------
    def response(self, requests: list[tuple[int, Request]], echoes: dict[int, str] | None = None) -> dict:
        """The whole answer of finished requests, each with its choice index (`echoes`: the prompt text
        that comes before a completion's text, by choice index)."""
        echoes = echoes or {}
        choices = [self._choice(index, request, echoes.get(index, "")) for index, request in requests]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.served,
                "choices": choices, "usage": usage([r for _, r in requests]), "system_fingerprint": None}

    def _choice(self, index: int, request: Request, echo: str = "") -> dict:
        choice: dict = {"index": index}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": request.text}
        else:
            choice["text"] = echo + request.text
        logprobs = None
        if self.logprobs is not None:  # the prompt's (echo) then the answer's
            logprobs = self.logprobs.write((request.prompt_logprobs or []) + request.logprobs)
        return {**choice, "logprobs": logprobs, "finish_reason": finish_reason(request)}

    # --- streamed answers ----------------------------------------------------------------------------
    def opening(self, indices: list[int]) -> list[dict]:
        """The chunks before any text: chat names the role of each choice; completions have none."""
        if not self.chat:
            return []
        return [self._chunk(index, {"role": "assistant", "content": ""}, None) for index in indices]

    def piece(self, index: int, text: str, logprobs: Sequence[TokenLogprob] = ()) -> dict:
        """A chunk with a piece of a choice's text (and the log-probabilities of the tokens computed since
        the last piece, when they were asked for)."""
        chunk = self._chunk(index, {"content": text} if self.chat else text, None)
        if self.logprobs is not None:
            offset = self._offsets.get(index, 0)
            chunk["choices"][0]["logprobs"] = self.logprobs.write(logprobs, offset)
            self._offsets[index] = offset + self.logprobs.text_length(logprobs)
        return chunk

    def last(self, index: int, request: Request) -> dict:
        """A choice's last chunk: its finish_reason, and its usage."""
        chunk = self._chunk(index, {} if self.chat else "", finish_reason(request))
        chunk["usage"] = usage([request])
        return chunk

    def usage_chunk(self, requests: list[Request]) -> dict:
        """The usage-only chunk (stream_options.include_usage)."""
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.served,
                "choices": [], "usage": usage(requests)}

    def _chunk(self, index: int, content: dict | str, finish: str | None) -> dict:
        choice: dict = {"index": index}
        if self.chat:
            choice["delta"] = content
        else:
            choice["text"] = content
        choice.update(logprobs=None, finish_reason=finish)
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.served,
                "choices": [choice]}


def finish_reason(request: Request) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def usage(requests: list[Request]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(r.generated for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


__all__ = ["ResponseFormat", "finish_reason", "sse", "usage"]
