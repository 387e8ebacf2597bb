"""The generation engine: one base model, many requests, continuous batching, per-row adapters.

Each `step()`:
  1. admits waiting requests into free rows of the running batch (`Scheduler`: their adapter in a slot,
     or loading in the background meanwhile: a load never stalls the batch) and prefills them: prompts
     that share a prefix with a stored one (same adapter) copy its keys/values instead of computing them
     (`PrefixCache`);
  2. runs one decode step for every running row (`Batch` plans the rows and KV-cache columns,
     `ModelRunner` runs transformers' own forward with each row's adapter slot, then chooses each row's
     next token, greedy or sampled with the request's own settings);
  3. turns the tokens into text and finishes the requests that hit a stop token, a stop string,
     max_tokens or the context length (`TextStream`), and frees their rows for the next step.

Requests that ask for log-probabilities get them from the same logits, row by row (`tailor.serve.logprobs`);
for a prompt's own tokens (echo), its prefill keeps the logits of every prompt position.

The engine is driven either synchronously (`generate`: evaluation, `tailor generate`) or by its own thread
(`start`: the server), where `submit` and `abort` may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tailor.serve.adapters import AdapterRef, EngineAdapters, UnknownAdapterError
from tailor.serve.batch import Batch
from tailor.serve.constraints import Constraints, OutputFormat
from tailor.serve.logprobs import generated_logprobs, prompt_logprobs
from tailor.serve.prefixes import PrefixCache, wants_prompt_logits
from tailor.serve.request import Request
from tailor.serve.runner import ModelRunner
from tailor.serve.sampling import SamplingParams, stop_token_ids
from tailor.serve.scheduler import Scheduler
from tailor.serve.stream import TextStream


class Engine:
    """Continuous-batching generation over one model.

    Args:
        model: a transformers causal LM (its active named adapters, if any, apply to every row).
        tokenizer: its tokenizer.
        adapters: per-row adapters by name (`AdapterManager` on the same model), or None.
        max_batch: rows computed together (running requests).
        max_model_len: prompt + answer limit (default: the model's max_position_embeddings).
        share_prefix: compute a prompt prefix shared with earlier prompts (same adapter) once.
        prefill_tokens: prompt tokens admitted per step while others decode (a long queue is prefilled
            over several steps, so running requests keep their pace).
    """

    def __init__(self, model: nn.Module, tokenizer, adapters: EngineAdapters | None = None,
                 max_batch: int = 32, max_model_len: int | None = None, share_prefix: bool = True,
                 prefill_tokens: int = 4096) -> None:
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"the engine runs models with sdpa or eager attention, not {attention!r}; "
                             "load the model with attn_implementation='sdpa'.")
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"the engine runs attention models only; this one has {sorted(kinds)} layers.")
        limit = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        window = getattr(config, "sliding_window", None)
        if window:  # within the window, sliding attention is full attention: exact, so cap the length there
            limit = min(limit, window)
        self.max_batch, self.max_model_len = max_batch, limit
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)  # any id: padding is masked
        self.device = next(model.parameters()).device
        # the ids a row's logits cover (a tokenizer may name fewer: an embedding padded to a multiple)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0) or len(tokenizer)
        self.stats = {"steps": 0, "prefill_tokens": 0, "prefix_tokens_reused": 0, "generated_tokens": 0}
        self.scheduler = Scheduler(adapters, max_batch, prefill_tokens)
        self.batch = Batch(config.num_hidden_layers, max_batch, self.device)
        self.prefixes = PrefixCache(share_prefix)
        self.runner = ModelRunner(model, self.batch.cache, adapters, attention)
        self.stream = TextStream(tokenizer, self.stop_ids, limit, self.stats)
        vocab = getattr(model.get_output_embeddings(), "out_features", None) or config.vocab_size  # logits
        self.constraints = Constraints(tokenizer, vocab, self.stop_ids)  # structured output: rows' grammars
        self.step_listeners: list[Callable[[Engine, int, float], None]] = []  # (engine, tokens, seconds)
        # (requests, logits): each forward's last-position logits, before the tokens are chosen
        self.logits_listeners: list[Callable[[list[Request], torch.Tensor], None]] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        if adapters is not None:
            adapters.on_ready = self._wake.set

    # --- what others read ----------------------------------------------------------------------------
    @property
    def running(self) -> list[Request]:
        return self.batch.running

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def col(self) -> int:
        return self.batch.col

    @property
    def has_work(self) -> bool:
        return bool(self.batch.running or self.scheduler.waiting)

    @property
    def share_prefix(self) -> bool:
        """Whether a prompt prefix shared with earlier prompts (same adapter) is computed once; switching
        it off is benchmarks/serve_throughput.py's ablation."""
        return self.prefixes.enabled

    @share_prefix.setter
    def share_prefix(self, on: bool) -> None:
        self.prefixes.enabled = on

    # --- requests ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (any thread). Its adapter name is resolved here, once, into the reference the
        request carries (UnknownAdapterError if there is no such adapter)."""
        if request.adapter is not None:
            if self.adapters is None:
                raise UnknownAdapterError(request.adapter_name)
            if not isinstance(request.adapter, AdapterRef):
                request.adapter = self.adapters.resolve(request.adapter)  # what the name stands for now
            self.adapters.prefetch(request.adapter)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token.")
        if len(request.prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; this model takes at most "
                             f"{self.max_model_len - 1} (with at least one to generate).")
        request.generator = request.params.generator(self.device)
        self.scheduler.add(request)
        self._wake.set()
        return request

    def abort(self, request: Request) -> None:
        """Stop a request (any thread): it finishes with finish_reason "abort" at the next step."""
        request.aborted = True
        self._wake.set()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[str | None] | None = None,
                 output: OutputFormat | None = None) -> list[Request]:
        """Run `prompts` to completion in this thread; the finished requests, in order. `output`: every
        answer must be JSON of that format (structured output)."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread: use submit() and wait on request.done.")
        every = params if isinstance(params, Sequence) else [params] * len(prompts)
        names = adapters if adapters is not None else [None] * len(prompts)
        requests = [Request(list(prompt), setting, name)
                    for prompt, setting, name in zip(prompts, every, names, strict=True)]
        if output is not None:
            for request in requests:
                request.constraint = self.constraints.row(output)
        for request in requests:
            self.submit(request)
        while not all(r.finished for r in requests):
            if not self.step():  # every waiting request waits for its adapter to load
                self._wake.wait(timeout=0.01)
                self._wake.clear()
        return requests

    # --- the thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a background thread until `stop()`."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="tailor-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.adapters is not None:
            self.adapters.close()

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                progressed = self.step()
            except Exception as error:  # a bug or a device error: fail what runs, keep serving
                self._fail_all(error)
                continue
            if not progressed:  # every waiting request waits for an adapter load
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _fail_all(self, error: Exception) -> None:
        for request in self.batch.clear() + self.scheduler.take_all():
            self.stream.fail(request, error)
            self._release(request)

    # --- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit and prefill waiting requests, then one decode step for all running rows.
        Returns whether any token was computed."""
        started = time.perf_counter()
        self._drop_aborted()
        tokens = self._admit()
        self._retire()  # those that stopped at their first token
        if self.batch.running:  # one decode step of every row
            logits = self.runner.forward(self.batch.decode())
            self.batch.advance()
            self._accept(self.batch.running, logits)
            tokens += len(self.batch.running)
        self._retire()
        if tokens:
            self.stats["steps"] += 1
            seconds = time.perf_counter() - started
            for listener in self.step_listeners:
                listener(self, tokens, seconds)
        return tokens > 0

    def _drop_aborted(self) -> None:
        for request in self.scheduler.take_aborted():
            self.stream.finish(request, "abort")
        for request in self.batch.running:
            if request.aborted and not request.finished:
                self.stream.finish(request, "abort")
        self._retire()

    def _admit(self) -> int:
        """Prefill the requests the scheduler lets join; the prompt tokens admitted."""
        joiners, failed = self.scheduler.admit(self.batch.free, decoding=bool(self.batch.running))
        for request, error in failed:
            self.stream.fail(request, error)
        if not joiners:
            return 0
        prefixes = self.prefixes.find(joiners, self._compute_prefix)
        forward, reused = self.batch.prefill(joiners, prefixes, self.pad_id)
        self.stats["prefix_tokens_reused"] += reused
        echoed = [r for r in joiners if wants_prompt_logits(r)]
        keep = max(len(r.prompt_ids) for r in echoed) if echoed else None  # rows end at the same column
        logits = self.runner.forward(forward, keep)
        if keep:
            for i, request in enumerate(joiners):
                if wants_prompt_logits(request):
                    own = logits[i, keep - len(request.prompt_ids):]  # (P, V): its prompt's positions
                    request.prompt_logprobs = prompt_logprobs(own, request.prompt_ids,
                                                              request.params.prompt_logprobs)
            logits = logits[:, -1]  # (n, V)
        self.batch.join(joiners)
        self._accept(joiners, logits)
        used = sum(len(r.prompt_ids) for r in joiners)
        self.stats["prefill_tokens"] += used
        return used

    def _compute_prefix(self, request: Request,
                        tokens: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run a prefix alone (one row, its adapter) in a spare row; its keys/values."""
        self.runner.forward(self.batch.prefix(request, tokens))
        return self.batch.read_prefix(len(tokens))

    def _accept(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Choose and append each request's next token; finish those that stop."""
        for listener in self.logits_listeners:
            listener(requests, logits)
        rows = [r.constraint for r in requests]
        masked = self.constraints.mask(rows, logits)  # structured output: each constrained row's grammar
        tokens = self.runner.choose(requests, masked, self.stop_ids)
        self.constraints.advance(rows, tokens)
        # log-probabilities of the model's own distribution (vLLM's default), before any grammar mask
        self.stream.accept(requests, tokens, generated_logprobs(requests, logits, tokens))
        for request in requests:  # complete JSON: finish now (the next token could only be a stop token)
            if request.constraint is not None and not request.finished and not request.params.ignore_eos \
                    and self.constraints.complete(request.constraint):
                self.stream.finish(request, "stop")

    def _retire(self) -> None:
        """Free the rows (and adapter slots) of finished requests."""
        left = self.batch.retire()
        for request in left:
            self._release(request)
        if left and not self.batch.running and self.adapters is not None:
            self.adapters.idle()  # free the decode rows' copies of their adapters

    def _release(self, request: Request) -> None:
        if request.slot >= 0 and self.adapters is not None:
            self.adapters.release(request.slot)
            request.slot = -1


__all__ = ["Engine", "Request"]
