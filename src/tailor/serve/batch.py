"""The running batch and where its tokens live in the KV cache: row i is request i, and every row shares
the column index (the layout is drawn in `tailor.serve.kv`).

`Batch` plans each forward (`Forward`: which rows, which columns it writes and attends to, the tokens,
their positions, the mask) for a prefill of joining requests, for a stored prefix, or for one decode step
of every row; it moves columns left (or grows the buffers) when the next step has no room, and frees the
rows of finished requests (the last row moves into each hole: one row copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailor.serve.kv import RowKVCache
from tailor.serve.prefixes import Prefix
from tailor.serve.request import Request


@dataclass
class Forward:
    """One forward of the model over planned rows and columns (see `RowKVCache.plan`)."""

    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    rows: torch.Tensor | None  # the rows written (None: rows 0..B-1)
    write_start: int  # the first column written
    view_start: int  # the first column attended to
    mask: torch.Tensor | None  # (B, 1, T, L) bool: what each query attends to (None: the causal mask)
    slots: list[int]  # each row's adapter slot


class Batch:
    """The running requests, their KV cache rows and columns (engine thread only).

    Args:
        num_layers: attention layers of the model.
        max_rows: the largest batch.
        device: where the cache and the masks live.
    """

    def __init__(self, num_layers: int, max_rows: int, device: torch.device) -> None:
        self.max_rows, self.device = max_rows, device
        self.cache = RowKVCache(num_layers, max_rows)
        self.valid = torch.zeros(max_rows, self.cache.columns, dtype=torch.bool, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.first_col: list[int] = [0] * max_rows
        self.col = 0  # the next column a decode step writes
        self.running: list[Request] = []  # request of row i

    @property
    def free(self) -> int:
        return self.max_rows - len(self.running)

    # --- prefill -------------------------------------------------------------------------------------
    def prefix(self, request: Request, tokens: tuple[int, ...]) -> Forward:
        """Plan a prefix alone (one row, the request's adapter) in a spare row: computed, then read
        back with `read_prefix`."""
        length = len(tokens)
        spare = len(self.running)  # a free row; overwritten by the joiners' prefill right after
        self.make_room(length, 0)
        start = self.col - length
        positions = torch.arange(length, device=self.device)[None]  # (1, P)
        return Forward(torch.tensor([tokens], device=self.device), positions,
                       torch.tensor([spare], device=self.device), start, start, None, [request.slot])

    def read_prefix(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys/values the last `prefix` forward wrote (per layer)."""
        return self.cache.read_prefix(len(self.running), slice(self.col - length, self.col))

    def prefill(self, joiners: list[Request], prefixes: list[Prefix | None],
                pad_id: int) -> tuple[Forward, int]:
        """Plan the joiners' prefill into the rows after the running ones: stored prefixes are copied
        into their rows (one copy per distinct prefix and layer), the rest of each prompt is computed.
        Returns the forward and the prefix tokens reused. `join` them after the forward."""
        shared = [len(p.tokens) if p is not None else 0 for p in prefixes]
        suffixes = [r.prompt_ids[s:] for r, s in zip(joiners, shared, strict=True)]
        width = max(len(s) for s in suffixes)  # suffix columns, right-aligned at col
        left = width + max(shared)
        self.make_room(left, 1)
        first = len(self.running)
        n = len(joiners)
        rows = torch.arange(first, first + n, device=self.device)
        self.valid[first : first + n] = False
        end = self.col
        suffix_start = end - width

        by_prefix: dict[int, tuple[Prefix, list[int]]] = {}
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                by_prefix.setdefault(id(prefix), (prefix, []))[1].append(first + i)
        reused = 0
        for prefix, members in by_prefix.values():
            length = len(prefix.tokens)
            columns = slice(suffix_start - length, suffix_start)
            self.cache.write_prefix(torch.tensor(members, device=self.device), columns, prefix.kv)
            self.valid[members, columns] = True
            reused += length * len(members)

        input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (n, width), left padded
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
        forward = Forward(input_ids.to(self.device), positions.to(self.device), rows, suffix_start,
                          view_start, mask, [r.slot for r in joiners])
        return forward, reused

    def join(self, joiners: list[Request]) -> None:
        self.running.extend(joiners)

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
    def decode(self) -> Forward:
        """Plan one decode step of every running row (its last token); `advance` after the forward."""
        batch = len(self.running)
        self.make_room(0, 1)
        col = self.col
        input_ids = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)  # (B, 1)
        positions = self.positions[:batch, None].clone()  # (B, 1)
        self.valid[:batch, col] = True
        view_start = min(self.first_col[:batch])
        valid = self.valid[:batch, view_start : col + 1]  # (B, L)
        mask = None if bool(valid.all()) else valid[:, None, None, :]  # (B, 1, 1, L)
        return Forward(input_ids, positions, None, col, view_start, mask, [r.slot for r in self.running])

    def advance(self) -> None:
        self.col += 1
        self.positions[: len(self.running)] += 1

    # --- leaving -------------------------------------------------------------------------------------
    def retire(self) -> list[Request]:
        """Free the rows of finished requests (the last row moves into each hole: one row copied);
        the requests that left."""
        if not any(r.finished for r in self.running):
            return []
        view_start = min(self.first_col[: len(self.running)], default=self.col)
        columns = slice(view_start, self.col)
        left = []
        row = 0
        while row < len(self.running):
            if not self.running[row].finished:
                row += 1
                continue
            left.append(self.running[row])
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
        return left

    def clear(self) -> list[Request]:
        """Drop every row (after a failed step); the requests that ran."""
        running, self.running, self.col = self.running, [], 0
        return running

    # --- columns -------------------------------------------------------------------------------------
    def make_room(self, left: int, right: int) -> None:
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
        valid = torch.zeros(self.max_rows, columns, dtype=torch.bool, device=self.device)
        valid[:, new_col - live : new_col] = self.valid[:, view_start : self.col]
        self.valid = valid
        for row in range(batch):
            self.first_col[row] += shift
        self.col = new_col


__all__ = ["Batch", "Forward"]
