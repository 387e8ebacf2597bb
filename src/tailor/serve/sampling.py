"""What a request asks for (SamplingParams), choosing each row's next token, and when a request stops."""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn

CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
MAX_LOGPROBS = 20  # most likely tokens reported per position (vLLM's default limit; OpenAI's is 5 and 20)


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the eos ids of the tokenizer and of the generation config, and the
    chat end-of-turn token when the vocabulary has one (ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...)."""
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (tokenizer.eos_token_id, generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in CHAT_END_TOKENS if token in vocab)
    return sorted(ids)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI's names and meanings).

    temperature 0 is greedy (argmax); otherwise logits / temperature, then the top_k most likely tokens
    (top_k <= 0: all), then nucleus sampling over the smallest set of tokens whose probability reaches
    top_p, drawn from the request's own generator (seeded with `seed`, so a seeded request gives the same
    answer whatever it is batched with, up to floating-point differences between batch shapes).

    vLLM's extensions, with vLLM's meanings (what benchmark clients send): `ignore_eos` (eos and chat
    end tokens do not stop), `min_tokens` (eos and `stop_token_ids` cannot be chosen, and stop strings are
    not looked for, before that many tokens), `stop_token_ids` (more tokens that end the answer, left out
    of its text), `repetition_penalty` (tailor.serve.processors; 1 is off). `logprobs` (the most likely
    tokens reported beside each chosen one; None: no log-probabilities) and `prompt_logprobs` (the same for
    the prompt's tokens, from the prefill: what `echo` with `logprobs` returns) are log_softmax of the raw
    logits, before any of the above (vLLM's default). max_tokens 0 computes the prompt only.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = -1
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            problems.append(f"max_tokens={self.max_tokens!r} must be an integer >= 0")
        if not 0 <= self.temperature <= 2:
            problems.append(f"temperature={self.temperature!r} must be in [0, 2]")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            problems.append(f"top_k={self.top_k!r} must be an integer >= -1 (-1 or 0: off)")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            problems.append(f"min_tokens={self.min_tokens!r} must be an integer in [0, max_tokens]")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1: off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                problems.append(f"{name}={value!r} must be in [0, {MAX_LOGPROBS}] or None")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            problems.append(f"stop={list(self.stop)!r} must be up to 4 non-empty strings")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (temperature 0, or top_k 1 at any temperature)."""
        return self.temperature == 0 or self.top_k == 1

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """The request's random generator (None when greedy): seeded with `seed`, else at random."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed)


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row. logits (B, V); greedy rows take the argmax, the others sample."""
    logits = logits.float()  # (B, V); argmax over fp32 is ~5x faster than over bf16 on CPU
    tokens = logits.argmax(dim=-1)  # (B,)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = logits[sampled]  # (S, V)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=rows.device)
        rows = rows / temperature[:, None]
        top_k = [params[i].top_k for i in sampled]
        if any(k > 0 for k in top_k):  # keep each row's k largest logits (ties at the k-th kept too)
            vocab = rows.shape[-1]
            k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=rows.device)
            kth = rows.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (S, 1)
            rows = rows.masked_fill(rows < kth, float("-inf"))
        probs = torch.softmax(rows, dim=-1)  # (S, V)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=rows.device)
        order = None
        if bool((top_p < 1).any()):
            probs, order = probs.sort(dim=-1, descending=True)  # (S, V) each
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            probs = probs.masked_fill(before >= top_p[:, None], 0.0)  # the first token always stays
        for j, i in enumerate(sampled):  # each request draws from its own generator
            pick = torch.multinomial(probs[j], 1, generator=generators[i])  # (1,)
            tokens[i] = order[j, pick[0]] if order is not None else pick[0]
    return tokens.tolist()


def stop_position(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the first stop string begins in text[start:] (as an index of text), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a stop string (not streamed yet), or end in
    an incomplete UTF-8 character."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    if text.endswith("\ufffd"):
        keep = max(keep, 1)
    return keep
