"""The generation engine: one base model, many requests, continuous batching, per-row adapters.

Each `step()`:
  1. admits waiting requests into free rows of the running batch (their adapter in a slot, or loading in
     the background meanwhile: a load never stalls the batch) and prefills them: prompts that share a
     prefix with a stored one (same adapter) copy its keys/values instead of computing them;
  2. runs one decode step for every running row: one forward of the model (transformers' own forward,
     with `RowKVCache` as its cache and each row's adapter slot set through `tailor.lora.rows`), then
     each row's next token (greedy or sampled with the request's own settings);
  3. finishes the requests that hit a stop token, a stop string, max_tokens or the context length, and
     frees their rows for the next step.

The engine is driven either synchronously (`generate`: evaluation, `tailor generate`) or by its own thread
(`start`: the server), where `submit` and `abort` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tailor.loss.supervised import output_head, transformer_body
from tailor.serve.adapters import AdapterManager, UnknownAdapterError
from tailor.serve.kv import RowKVCache
from tailor.serve.sampling import SamplingParams, choose_tokens, held_back, stop_position, stop_token_ids

MIN_SHARED_PREFIX = 16  # tokens; below this a separate prefix forward costs more than it saves
MAX_PREFIXES = 32  # prefixes kept (keys/values of every layer), least recently used out first
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its result.

    `on_update(request, delta)` (optional, for streaming) is called from the engine's thread with each
    new piece of text (deltas hold back what may begin a stop string), and once more when the request
    finishes; `on_finish(request)` (optional) once, when it finishes (`finish_reason` set: "stop",
    "length", "abort", or "error" with `error`). Neither may block.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    on_update: Callable[[Request, str], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)  # the answer (a final stop token left out)
    generated: int = 0  # tokens generated, a final stop token included (usage.completion_tokens)
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    # engine state
    slot: int = -1
    adapter_dir: Path | None = None
    generator: torch.Generator | None = None
    sent: int = 0  # characters of text already passed to on_update
    done: threading.Event = field(default_factory=threading.Event)
    _aborted: bool = False
    _cut: bool = False  # text was cut at a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Prefix:
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (heads, P, dim)


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

    def __init__(self, model: nn.Module, tokenizer, adapters: AdapterManager | None = None,
                 max_batch: int = 32, max_model_len: int | None = None, share_prefix: bool = True,
                 prefill_tokens: int = 4096) -> None:
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        self.attention = getattr(config, "_attn_implementation", None) or "eager"
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"the engine runs models with sdpa or eager attention, not {self.attention!r}; "
                             "load the model with attn_implementation='sdpa'.")
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"the engine runs attention models only; this one has {sorted(kinds)} layers.")
        limit = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        window = getattr(config, "sliding_window", None)
        if window:  # within the window, sliding attention is full attention: exact, so cap the length there
            limit = min(limit, window)
        self.max_batch, self.share_prefix, self.prefill_tokens = max_batch, share_prefix, prefill_tokens
        self.max_model_len = limit
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))
        self._split = _body_and_head(model)  # (body, head) when the logits are just head(hidden)
        self._hidden: torch.Tensor | None = None
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)  # any id: padding is masked
        self.device = next(model.parameters()).device
        self.cache = RowKVCache(config.num_hidden_layers, max_batch)
        self.valid = torch.zeros(max_batch, self.cache.columns, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.first_col: list[int] = [0] * max_batch
        self.col = 0  # the next column a decode step writes
        self.running: list[Request] = []  # request of row i
        self.waiting: deque[Request] = deque()
        self.prefixes: OrderedDict[tuple, _Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"steps": 0, "prefill_tokens": 0, "prefix_tokens_reused": 0, "generated_tokens": 0}
        self.step_listeners: list[Callable[[Engine, int, float], None]] = []  # (engine, tokens, seconds)
        if adapters is not None:
            adapters.on_ready = self._wake.set

    # --- requests ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (any thread). Its adapter must exist (UnknownAdapterError otherwise)."""
        if request.adapter is not None:
            if self.adapters is None:
                raise UnknownAdapterError(request.adapter)
            request.adapter_dir = self.adapters.path(request.adapter)  # what the name stands for now
            self.adapters.prefetch(request.adapter)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token.")
        if len(request.prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; this model takes at most "
                             f"{self.max_model_len - 1} (with at least one to generate).")
        request.generator = request.params.generator(self.device)
        with self._lock:
            self.waiting.append(request)
        self._wake.set()
        return request

    def abort(self, request: Request) -> None:
        """Stop a request (any thread): it finishes with finish_reason "abort" at the next step."""
        request._aborted = True
        self._wake.set()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[str | None] | None = None) -> list[Request]:
        """Run `prompts` to completion in this thread; the finished requests, in order."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread: use submit() and wait on request.done.")
        every = params if isinstance(params, Sequence) else [params] * len(prompts)
        names = adapters if adapters is not None else [None] * len(prompts)
        requests = [self.submit(Request(list(prompt), setting, name))
                    for prompt, setting, name in zip(prompts, every, names, strict=True)]
        while not all(r.finished for r in requests):
            if not self.step():  # every waiting request waits for its adapter to load
                self._wake.wait(timeout=0.01)
                self._wake.clear()
        return requests

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

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
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in list(self.running) + waiting:
            request.error = error
            self._finish(request, "error")
            if request.slot >= 0 and self.adapters is not None:
                self.adapters.release(request.slot)
                request.slot = -1
        self.running, self.col = [], 0

    # --- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit and prefill waiting requests, then one decode step for all running rows.
        Returns whether any token was computed."""
        started = time.perf_counter()
        self._drop_aborted()
        tokens = self._admit()
        self._retire()  # those that stopped at their first token
        if self.running:
            self._decode()
            tokens += len(self.running)
        self._retire()
        if tokens:
            self.stats["steps"] += 1
            seconds = time.perf_counter() - started
            for listener in self.step_listeners:
                listener(self, tokens, seconds)
        return tokens > 0

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted = [r for r in self.waiting if r._aborted]
            for request in aborted:
                self.waiting.remove(request)
        for request in aborted:
            self._finish(request, "abort")
        for request in self.running:
            if request._aborted and not request.finished:
                self._finish(request, "abort")
        self._retire()

    # --- admission and prefill -----------------------------------------------------------------------
    def _admit(self) -> int:
        free = self.max_batch - len(self.running)
        if free <= 0:
            return 0
        joiners: list[Request] = []
        budget = self.prefill_tokens if self.running else max(self.prefill_tokens, 1)
        with self._lock:
            candidates = list(self.waiting)
        used = 0
        loading: set[str] = set()  # adapters not ready; past a few, later requests wait their turn to load
        for request in candidates[: 4 * self.max_batch]:
            if len(joiners) == free or (joiners and used + len(request.prompt_ids) > budget):
                break
            if request.adapter is not None:
                if request.adapter in loading or len(loading) >= self.adapters.max_cpu_loras:
                    continue
                failure = self.adapters.failure(request.adapter)
                if failure is not None:
                    with self._lock:
                        self.waiting.remove(request)
                    request.error = failure
                    self._finish(request, "error")
                    continue
                slot = self.adapters.acquire(request.adapter, request.adapter_dir)
                if slot is None:
                    loading.add(request.adapter)
                    continue  # loading (or all slots busy): later requests may go first
                request.slot = slot
            with self._lock:
                self.waiting.remove(request)
            joiners.append(request)
            used += len(request.prompt_ids)
        if not joiners:
            return 0
        self._prefill(joiners)
        self.stats["prefill_tokens"] += used
        return used

    def _adapter_key(self, request: Request) -> tuple | None:
        return None if request.slot < 0 else self.adapters.key(request.slot)

    def _find_prefixes(self, joiners: list[Request]) -> list[_Prefix | None]:
        """The stored prefix each joiner starts with (same adapter), after storing new ones that several
        joiners share."""
        if not self.share_prefix:
            return [None] * len(joiners)
        found = [self._stored_prefix(r) for r in joiners]
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(joiners):
            if found[i] is None:
                groups.setdefault((self._adapter_key(request),), []).append(i)
        for (key,), members in groups.items():
            if len(members) < 2:
                continue
            prompts = [joiners[i].prompt_ids for i in members]
            length = _common_prefix_length(prompts)
            length = min(length, min(len(p) for p in prompts) - 1)  # keep one token to compute per row
            if length < MIN_SHARED_PREFIX:
                continue
            prefix = self._compute_prefix(joiners[members[0]], key, tuple(prompts[0][:length]))
            for i in members:
                found[i] = prefix
        return found

    def _stored_prefix(self, request: Request) -> _Prefix | None:
        key = self._adapter_key(request)
        best = None
        for (adapter_key, tokens), prefix in self.prefixes.items():
            if adapter_key == key and len(tokens) < len(request.prompt_ids) \
                    and (best is None or len(tokens) > len(best.tokens)) \
                    and tuple(request.prompt_ids[: len(tokens)]) == tokens:
                best = prefix
        if best is not None:
            self.prefixes.move_to_end((key, best.tokens))
        return best

    def _compute_prefix(self, request: Request, key: tuple | None, tokens: tuple[int, ...]) -> _Prefix:
        """Run the prefix alone (one row, its adapter) into a spare row, and store its keys/values."""
        length = len(tokens)
        spare = len(self.running)  # a free row; overwritten by the joiners' prefill right after
        self._make_room(length, 0)
        start = self.col - length
        positions = torch.arange(length, device=self.device)[None]  # (1, P)
        self._forward(torch.tensor([tokens], device=self.device), positions,
                      rows=torch.tensor([spare], device=self.device), write_start=start, view_start=start,
                      mask=None, slots=[request.slot])
        prefix = _Prefix(tokens, self.cache.read_prefix(spare, slice(start, self.col)))
        self.prefixes[(key, tokens)] = prefix
        while len(self.prefixes) > MAX_PREFIXES:
            self.prefixes.popitem(last=False)
        return prefix

    def _prefill(self, joiners: list[Request]) -> None:
        prefixes = self._find_prefixes(joiners)
        shared = [len(p.tokens) if p is not None else 0 for p in prefixes]
        suffixes = [r.prompt_ids[s:] for r, s in zip(joiners, shared, strict=True)]
        width = max(len(s) for s in suffixes)  # suffix columns, right-aligned at col
        left = width + max(shared)
        self._make_room(left, 1)
        first = len(self.running)
        n = len(joiners)
        rows = torch.arange(first, first + n, device=self.device)
        self.valid[first : first + n] = False
        end = self.col
        suffix_start = end - width

        # stored prefixes: copy their keys/values into the rows (one copy per distinct prefix and layer)
        by_prefix: dict[int, tuple[_Prefix, list[int]]] = {}
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                by_prefix.setdefault(id(prefix), (prefix, []))[1].append(first + i)
        for prefix, members in by_prefix.values():
            length = len(prefix.tokens)
            columns = slice(suffix_start - length, suffix_start)
            self.cache.write_prefix(torch.tensor(members, device=self.device), columns, prefix.kv)
            self.valid[members, columns] = True
            self.stats["prefix_tokens_reused"] += length * len(members)

        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)  # (n, width), left padded
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, (suffix, skip) in enumerate(zip(suffixes, shared, strict=True)):
            input_ids[i, width - len(suffix) :] = torch.tensor(suffix)
            positions[i, width - len(suffix) :] = torch.arange(skip, skip + len(suffix))
            self.valid[first + i, end - len(suffix) : end] = True
            self.first_col[first + i] = suffix_start - skip if skip else end - len(suffix)
            self.positions[first + i] = skip + len(suffix)
        view_start = end - left
        simple = n == 1 and not shared[0]  # one prompt, no gaps: the model's own causal mask (exact)
        mask = None if simple else self._prefill_mask(rows, view_start, suffix_start, end)
        logits = self._forward(input_ids.to(self.device), positions.to(self.device), rows=rows,
                               write_start=suffix_start, view_start=view_start, mask=mask,
                               slots=[r.slot for r in joiners])
        self.running.extend(joiners)
        self._accept(joiners, logits)

    def _prefill_mask(self, rows: torch.Tensor, view_start: int, query_start: int, end: int) -> torch.Tensor:
        """(n, 1, T, L) bool: a query attends to its row's valid columns up to its own, and always itself
        (so that a padding query has something to attend to and stays finite)."""
        keys = torch.arange(view_start, end, device=self.device)  # (L,)
        queries = torch.arange(query_start, end, device=self.device)  # (T,)
        causal = keys[None, :] <= queries[:, None]  # (T, L)
        own = keys[None, :] == queries[:, None]  # (T, L)
        valid = self.valid.index_select(0, rows)[:, view_start:end]  # (n, L)
        return ((valid[:, None, :] & causal[None]) | own[None])[:, None]  # (n, 1, T, L)

    # --- decode --------------------------------------------------------------------------------------
    def _decode(self) -> None:
        batch = len(self.running)
        self._make_room(0, 1)
        col = self.col
        input_ids = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)  # (B, 1)
        positions = self.positions[:batch, None].clone()  # (B, 1)
        self.valid[:batch, col] = True
        view_start = min(self.first_col[:batch])
        valid = self.valid[:batch, view_start : col + 1]  # (B, L)
        mask = None if bool(valid.all()) else valid[:, None, None, :]  # (B, 1, 1, L)
        logits = self._forward(input_ids, positions, rows=None, write_start=col, view_start=view_start,
                               mask=mask, slots=[r.slot for r in self.running])
        self.col += 1
        self.positions[:batch] += 1
        self._accept(self.running, logits)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None,
                 write_start: int, view_start: int, mask: torch.Tensor | None,
                 slots: list[int]) -> torch.Tensor:
        """One forward of the model over the planned rows/columns; the last position's logits (B, V)."""
        self.cache.plan(rows, write_start, view_start)
        if mask is not None and self.attention == "eager":  # eager attention adds the mask
            mask = torch.zeros(mask.shape, dtype=self._dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self._dtype).min)
        table = self.adapters.slots if self.adapters is not None else None
        if table is not None:
            table.set_rows(slots)
        try:
            if self._split is None:
                out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                                 cache=self.cache, use_cache=True, logits_to_keep=1)
                self._hidden = None
                return out.logits[:, -1, :]  # (B, V)
            body, head = self._split
            out = body(input_ids=input_ids, position_ids=positions, attention_mask=mask, cache=self.cache,
                       use_cache=True)
            self._hidden = out.last_hidden_state[:, -1, :]  # (B, H): the greedy choice is refined from it
            return head(self._hidden)  # (B, V)
        finally:
            if table is not None:
                table.set_rows(None)

    def _greedy(self, logits: torch.Tensor, k: int = 4) -> torch.Tensor:
        """Each row's argmax, with the top k of the model-dtype logits scored again with fp32 accumulation.

        bf16 logits are rounded to 1/8 near 25: two tokens a few hundredths apart often round to the same
        value, and the argmax would then take the lower token id. Re-scoring k candidates costs k dot
        products per row (the full head in fp32 would cost 3.5x the bf16 head).
        """
        _, head = self._split
        top = logits.topk(k, dim=-1).indices  # (B, k)
        rows = head.weight.index_select(0, top.reshape(-1)).view(*top.shape, -1).float()  # (B, k, H)
        scores = torch.bmm(rows, self._hidden.float()[:, :, None]).squeeze(-1)  # (B, k, H) @ (B, H, 1)
        if head.bias is not None:
            scores = scores + head.bias[top].float()
        return top.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)  # (B,)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _accept(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Choose and append each request's next token; finish those that stop."""
        tokens = choose_tokens(logits, [r.params for r in requests], [r.generator for r in requests])
        if self._hidden is not None and logits.dtype != torch.float32:
            greedy = self._greedy(logits).tolist()
            tokens = [g if r.params.temperature == 0 else t
                      for r, t, g in zip(requests, tokens, greedy, strict=True)]
        now = time.perf_counter()
        for request, token in zip(requests, tokens, strict=True):
            if request.finished:
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            request.generated += 1
            self.stats["generated_tokens"] += 1
            if token in self.stop_ids and not request.params.ignore_eos:
                self._finish(request, "stop")
                continue
            request.output_ids.append(token)
            if request.params.stop or request.on_update is not None:
                self._update_text(request)  # may finish it at a stop string
            full = len(request.prompt_ids) + len(request.output_ids) >= self.max_model_len
            if not request.finished and (len(request.output_ids) >= request.params.max_tokens or full):
                self._finish(request, "length")

    def _update_text(self, request: Request, final: bool = False) -> None:
        before = len(request.text)
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        stops = request.params.stop
        if stops:
            found = stop_position(text, stops, max(0, before - max(len(s) for s in stops)))
            if found is not None:
                request.text, request._cut = text[:found], True
                self._finish(request, "stop")
                return
        request.text = text
        if request.on_update is not None:
            end = len(text) if final else len(text) - held_back(text, stops)
            if end > request.sent:
                delta, request.sent = text[request.sent : end], end
                request.on_update(request, delta)

    def _finish(self, request: Request, reason: str) -> None:
        if request.finished:
            return
        if not request._cut:  # the whole answer (a stop string already cut the text where it began)
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

    def _retire(self) -> None:
        """Free the rows of finished requests: the last row moves into each hole (one row copied)."""
        if not any(r.finished for r in self.running):
            return
        view_start = min(self.first_col[: len(self.running)], default=self.col)
        columns = slice(view_start, self.col)
        row = 0
        while row < len(self.running):
            if not self.running[row].finished:
                row += 1
                continue
            request = self.running[row]
            if request.slot >= 0 and self.adapters is not None:
                self.adapters.release(request.slot)
                request.slot = -1
            last = len(self.running) - 1
            if row != last:
                self.cache.move_row(last, row, columns)
                self.valid[row] = self.valid[last]
                self.positions[row] = self.positions[last]
                self.first_col[row] = self.first_col[last]
                self.running[row] = self.running[last]
            self.running.pop()
        if not self.running:
            self.col = 0
            if self.adapters is not None:  # idle: free the decode rows' copies of their adapters
                self.adapters.slots.drop_row_copies()

    # --- columns -------------------------------------------------------------------------------------
    def _make_room(self, left: int, right: int) -> None:
        """Make the next write column at least `left` and leave `right` free columns after it, moving the
        running rows' columns (left, to reuse space) or growing the buffers when needed."""
        batch = len(self.running)
        view_start = min(self.first_col[:batch], default=self.col)
        live = self.col - view_start
        if self.col >= left and self.col + right <= self.cache.columns:
            return
        if not batch and left + right <= self.cache.columns:  # nothing to move
            self.col = left
            return
        new_col = max(left, live)
        columns = self.cache.columns
        if new_col + right > columns // 2:  # keep half free: a move (copies the cache) every columns/2 steps
            columns = max(2 * columns, 2 * (new_col + right))
        shift = new_col - self.col
        self.cache.resize(columns, slice(view_start, self.col), new_col - live)
        valid = torch.zeros(self.max_batch, columns, dtype=torch.bool, device=self.device)
        valid[:, new_col - live : new_col] = self.valid[:, view_start : self.col]
        self.valid = valid
        for row in range(batch):
            self.first_col[row] += shift
        self.col = new_col


# Model types whose causal-LM forward is exactly `logits = lm_head(hidden)` (no softcap, no scaling).
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo",
                     "olmo2", "starcoder2"}


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(transformer body, plain nn.Linear head) when the engine may run them apart (to refine greedy
    choices in fp32); None for fp32 models (nothing to refine) and anything else."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    if next(model.parameters()).dtype == torch.float32:
        return None
    try:
        body, head = transformer_body(model), output_head(model)
    except TypeError:
        return None
    if type(head) is not nn.Linear:  # a LoRA-wrapped head: keep forward
        return None
    return body, head


def _common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


__all__ = ["Engine", "MIN_SHARED_PREFIX", "Request"]
