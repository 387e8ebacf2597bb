"""The running batch's KV cache: preallocated rows and columns, so requests join and leave between steps.

Every row is one request. All rows share the column index: a decode step writes column ``col`` of every
row, and each row's ``valid`` mask says which of its columns hold its tokens (a request that joined late
starts at a later column; padding and gaps are invalid). Positions (RoPE) are per row, given explicitly,
so gaps never change the result::

    row 0:  [p p p p p g g g]            p prompt, g generated, . invalid
    row 1:  [. . . p p p g g]            a joiner: its prompt ends where the batch's next column starts
    row 2:  [. S S . . p p g]            S a shared prefix copied from the prefix store, then the suffix
            view_start ^      ^ col

A step attends over the columns [view_start, col] (view_start = the earliest valid column of any row):
in a decode step the rows are 0..B-1 and the keys are views of the buffers (no copy). A leaving row is
replaced by the last row (one row copied); joining rows are prefilled straight into their rows.

This is a transformers ``Cache`` (one layer object per attention layer), so the model's own forward runs
unchanged; the engine passes the attention mask (4D, built from ``valid``) and the position ids.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class RowCacheLayer(CacheLayerMixin):
    """One attention layer's keys and values: (rows, kv_heads, columns, head_dim) buffers."""

    is_sliding = False

    def __init__(self, owner: RowKVCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        _, heads, _, dim = key_states.shape
        shape = (owner.max_rows, heads, owner.columns, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape[:3] + (value_states.shape[-1],), dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's keys/values (rows, heads, T, dim) at the planned rows and columns; return the
        keys/values the step attends to (rows, heads, view columns, dim)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        start, end = owner.write_start, owner.write_start + key_states.shape[2]
        rows = owner.rows
        if rows is None:  # decode: rows 0..B-1, the attended keys are views
            n = key_states.shape[0]
            self.keys[:n, :, start:end] = key_states
            self.values[:n, :, start:end] = value_states
            return self.keys[:n, :, owner.view_start:end], self.values[:n, :, owner.view_start:end]
        self.keys[:, :, start:end].index_copy_(0, rows, key_states)
        self.values[:, :, start:end].index_copy_(0, rows, value_states)
        return (self.keys[:, :, owner.view_start:end].index_select(0, rows),
                self.values[:, :, owner.view_start:end].index_select(0, rows))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.write_start - self.owner.view_start + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.write_start - self.owner.view_start

    def get_max_length(self) -> int:
        return -1

    # --- what the engine does between steps ---------------------------------------------------------
    def resize(self, columns: int, keep: slice, to: int) -> None:
        """New buffers of `columns` columns holding the old columns `keep` at column `to`."""
        if not self.is_initialized:
            return
        width = keep.stop - keep.start
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[:2] + (columns,) + old.shape[3:], dtype=old.dtype, device=old.device)
            new[:, :, to : to + width] = old[:, :, keep]
            setattr(self, name, new)

    def move_row(self, source: int, target: int, columns: slice) -> None:
        if self.is_initialized:
            self.keys[target, :, columns] = self.keys[source, :, columns]
            self.values[target, :, columns] = self.values[source, :, columns]

    def write_rows(self, rows: torch.Tensor, columns: slice, keys: torch.Tensor,
                   values: torch.Tensor) -> None:
        """Copy one (heads, P, dim) prefix into `rows` at `columns` (a broadcast, one copy per row)."""
        n = rows.shape[0]
        self.keys[:, :, columns].index_copy_(0, rows, keys.unsqueeze(0).expand(n, *keys.shape))
        self.values[:, :, columns].index_copy_(0, rows, values.unsqueeze(0).expand(n, *values.shape))


class RowKVCache(Cache):
    """KV cache of the running batch: `max_rows` rows, `columns` columns (grows on demand).

    Before each forward the engine sets the plan: ``rows`` (None for rows 0..B-1, else an index tensor of
    the rows being prefilled), ``write_start`` (the first column this forward writes) and ``view_start``
    (the first column it attends to).
    """

    def __init__(self, num_layers: int, max_rows: int, columns: int = 256) -> None:
        self.max_rows, self.columns = max_rows, columns
        self.rows: torch.Tensor | None = None
        self.write_start = 0
        self.view_start = 0
        super().__init__(layers=[RowCacheLayer(self) for _ in range(num_layers)])

    def plan(self, rows: torch.Tensor | None, write_start: int, view_start: int) -> None:
        self.rows, self.write_start, self.view_start = rows, write_start, view_start

    def resize(self, columns: int, keep: slice, to: int = 0) -> None:
        """Reallocate to `columns` columns, moving the old columns `keep` to start at column `to`."""
        for layer in self.layers:
            layer.resize(columns, keep, to)
        self.columns = columns

    def shift(self, keep: slice, to: int) -> None:
        """Move columns `keep` of every row to start at column `to` (same buffer size)."""
        self.resize(self.columns, keep, to)

    def move_row(self, source: int, target: int, columns: slice) -> None:
        for layer in self.layers:
            layer.move_row(source, target, columns)

    def write_prefix(self, rows: torch.Tensor, columns: slice,
                     prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a stored prefix, one (keys, values) pair of (heads, P, dim) per layer, into `rows`."""
        for layer, (keys, values) in zip(self.layers, prefix, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(keys.unsqueeze(0), values.unsqueeze(0))
            layer.write_rows(rows, columns, keys, values)

    def read_prefix(self, row: int, columns: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one row's keys and values at `columns`, per layer: what the prefix store keeps."""
        return [(layer.keys[row, :, columns].clone(), layer.values[row, :, columns].clone())
                for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
