"""Log-probabilities as the OpenAI API returns them.

At each position: the chosen token's log-probability under the model's distribution, log_softmax of the
raw logits (before temperature, penalties, top-k or top-p: vLLM's default, "raw_logprobs"), and the most
likely tokens. Computed per row of the heterogeneous batch (each row's logits come from its own adapter)
for the generated tokens (`logprobs`) and, from the prefill's logits, for the prompt's tokens (`echo` with
`logprobs`: what lm-evaluation-harness scores likelihoods with; the first prompt token has no context,
so its log-probability is null).

Written in the two shapes the API has:
  completions  {"tokens": [str], "token_logprobs": [float|null], "top_logprobs": [{str: float}|null],
                "text_offset": [int]}; each top_logprobs dict holds the `logprobs` most likely tokens and
                the chosen one (vLLM's meaning)
  chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
                "bytes"}]}]}; exactly `top_logprobs` most likely tokens per position
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# JSON has no -inf: a token the model rules out reports this (vLLM's floor too)
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability (None: the prompt's first token), and the most
    likely tokens with theirs, most likely first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each row's token log-probability and its k most likely tokens. logits (R, V), tokens R ids."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]  # (R, 1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()  # (R,)
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (R, k) each
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)]


def generated_logprobs(requests: Sequence, logits: torch.Tensor,
                       tokens: Sequence[int]) -> list[TokenLogprob | None] | None:
    """The chosen tokens' log-probabilities for the requests that asked (None for the others; None
    when none asked). logits (B, V): the step's raw logits, row i request i's."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    k = max(requests[i].params.logprobs for i in rows)
    found = logprobs_of(logits[rows], [tokens[i] for i in rows], k)
    out: list[TokenLogprob | None] = [None] * len(requests)
    for i, entry in zip(rows, found, strict=True):
        keep = requests[i].params.logprobs
        out[i] = entry if keep == k else TokenLogprob(entry.token, entry.logprob, entry.top[:keep])
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[TokenLogprob]:
    """The prompt's tokens with their log-probabilities given the tokens before them. logits (P, V): the
    prefill's logits at the prompt's P positions (position j predicts token j + 1)."""
    first = TokenLogprob(prompt[0], None)
    return [first] + (logprobs_of(logits[:-1], prompt[1:], k) if len(prompt) > 1 else [])


class TokenTexts:
    """Each token id's own text (decoded alone, special tokens kept), remembered: a vocabulary's worth at
    most."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text


def _finite(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class LogprobsWriter:
    """Writes positions in the completions shape (`chat` False) or the chat shape, `top` most likely
    tokens per position."""

    def __init__(self, texts: TokenTexts, chat: bool, top: int) -> None:
        self.texts, self.chat, self.top = texts, chat, top

    def write(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
        """Positions in this writer's shape; `offset`: where the first token's text begins in the choice's
        text (completions' text_offset; streamed pieces continue where the last ended)."""
        return self._chat(entries) if self.chat else self._completion(entries, offset)

    def text_length(self, entries: Sequence[TokenLogprob]) -> int:
        """The characters the entries' token texts take (to continue text_offset in the next piece)."""
        return sum(len(self.texts(e.token)) for e in entries)

    def _completion(self, entries: Sequence[TokenLogprob], offset: int) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries:
            text = self.texts(entry.token)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            if entry.logprob is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_finite(entry.logprob))
            top = {self.texts(t): _finite(v) for t, v in entry.top[: self.top]}
            top.setdefault(text, _finite(entry.logprob))  # the chosen token too (vLLM)
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    def _chat(self, entries: Sequence[TokenLogprob]) -> dict:
        return {"content": [{**self._chat_token(e.token, e.logprob),
                             "top_logprobs": [self._chat_token(t, v) for t, v in e.top[: self.top]]}
                            for e in entries]}

    def _chat_token(self, token: int, logprob: float | None) -> dict:
        text = self.texts(token)
        return {"token": text, "logprob": _finite(logprob) if logprob is not None else None,
                "bytes": list(text.encode("utf-8", errors="replace"))}


__all__ = ["LOGPROB_FLOOR", "LogprobsWriter", "TokenLogprob", "TokenTexts", "generated_logprobs",
           "logprobs_of", "prompt_logprobs"]
