"""Structured output: each row of the batch may carry its own grammar (a JSON Schema, or any JSON object),
which masks the tokens it cannot take before the row's token is chosen.

The grammar engine is xgrammar (chosen by measured per-token mask cost: benchmarks/grammar_engines.py,
docs/serving.md), imported only when a request asks for structured output; it is the optional extra
`tailor[structured]`. Per step, `Constraints.mask` fills the next-token bitmask of every constrained row
with one batched call (xgrammar's BatchGrammarMatcher, its own threads), unpacks it (numpy's unpackbits)
and masks the logits in one `torch.where` pass; `Constraints.advance` moves each row's matcher by the
token chosen. Rows without a constraint are not touched, so an unconstrained row's answer is the same in
any batch.

JSON comes out on one line with compact separators (`{"a":1,"b":[2,3]}`): free whitespace lets a small
model pad an answer with blanks until max_tokens, and the built-in task's answers are written compactly.
A row whose grammar is complete can only take a stop token; the engine finishes it with "stop" at once
(`Constraints.complete`), without the step that would choose that token.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INSTALL_HINT = "pip install 'tailor[structured]' (the xgrammar grammar engine)"
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_SEPARATORS = (",", ":")  # compact JSON on one line (see the module docstring)
_ANY_OBJECT = '{"type": "object"}'
_ENGINE_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix


class StructuredOutputError(ValueError):
    """A response format or JSON Schema that cannot be enforced; the message names the problem."""


@dataclass(frozen=True)
class OutputFormat:
    """What a request's answer must be: any JSON object (`schema` None) or JSON that `schema` accepts
    (the JSON Schema as JSON text; the properties come out in its order)."""

    schema: str | None = None
    name: str | None = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, name: str | None = None) -> OutputFormat:
        if not isinstance(schema, dict | bool):
            raise StructuredOutputError(f"a JSON Schema is an object (or true/false), not "
                                        f"{type(schema).__name__}: {schema!r:.80}.")
        return cls(json.dumps(schema, separators=(",", ":")), name)  # key order kept: the properties' order


def read_json_schema(path: str | Path) -> OutputFormat:
    """The JSON Schema in file `path` (`tailor generate --json-schema FILE`, `tailor eval --json-schema`);
    StructuredOutputError naming the file, and the line and column of a JSON mistake."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StructuredOutputError(f"cannot read the JSON Schema file {path}: {error}.") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise StructuredOutputError(f"{path}, line {error.lineno}, column {error.colno}: not JSON "
                                    f"({error.msg}); a JSON Schema file holds one JSON object.") from None
    try:
        return OutputFormat.json_schema(schema, path.stem)
    except StructuredOutputError as error:
        raise StructuredOutputError(f"{path}: {error}") from None


def structured_output_available() -> bool:
    """Whether the grammar engine (the extra `tailor[structured]`) is installed."""
    import importlib.util

    return importlib.util.find_spec("xgrammar") is not None


def parse_response_format(value: dict[str, Any] | None,
                          param: str = "response_format") -> OutputFormat | None:
    """OpenAI's `response_format` as an OutputFormat (None for plain text). Shapes:
    {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}.
    Raises StructuredOutputError naming the bad field and its valid values."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StructuredOutputError(f"{param} must be an object such as {{\"type\": \"json_object\"}}.")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        choices = ", ".join(RESPONSE_FORMAT_TYPES)
        raise StructuredOutputError(f"{param}.type={kind!r} is not one of {choices}.")
    extra = sorted(set(value) - {"type", "json_schema"} if kind == "json_schema" else set(value) - {"type"})
    if extra:
        raise StructuredOutputError(f"{param} with type {kind!r} takes no field {', '.join(extra)}.")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat()
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise StructuredOutputError(f"{param}.json_schema must be an object: "
                                    "{\"name\": ..., \"schema\": {...JSON Schema...}, \"strict\": true}.")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise StructuredOutputError(f"{param}.json_schema has unknown field(s) {', '.join(unknown)}; "
                                    "its fields are name, schema, strict, description.")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise StructuredOutputError(f"{param}.json_schema.name={name!r} must be 1-64 letters, digits, "
                                    "underscores or dashes.")
    if "schema" not in spec:
        raise StructuredOutputError(f"{param}.json_schema.schema is missing: give the JSON Schema the answer "
                                    "must satisfy.")
    try:
        return OutputFormat.json_schema(spec["schema"], name)
    except StructuredOutputError as error:
        raise StructuredOutputError(f"{param}.json_schema.schema: {error}") from None


class RowConstraint:
    """One row's grammar state (an xgrammar matcher); advanced with each token the row takes."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        # a token outside the mask (only a bug could choose one) leaves the matcher where it was; the
        # answer then fails to parse rather than the server failing
        self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class Constraints:
    """The grammars of one engine's tokenizer: compiles output formats (cached), builds row matchers, masks
    a batch's logits and advances its matchers (the masks from the engine's thread only).

    Args:
        tokenizer: the engine's tokenizer (a Hugging Face tokenizer).
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
        stop_ids: token ids that end an answer: the only tokens a complete grammar allows.
        threads: threads of the batched mask fill.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int], threads: int = 2) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self.threads = threads
        self._lock = threading.Lock()  # compile may run on server threads while the engine masks
        self._compiler = None
        self._batch = None
        self._bitmask: torch.Tensor | None = None  # (rows, ceil(V / 32)) int32, on the CPU

    def _engine(self):
        """xgrammar's compiler for this tokenizer (built on first use: about a second for 49k tokens)."""
        with self._lock:
            if self._compiler is None:
                xgrammar = _import_xgrammar()
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=sorted(self.stop_ids))
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=self.threads)
                self._batch = xgrammar.BatchGrammarMatcher(self.threads)
            return self._compiler

    def compile(self, output: OutputFormat):
        """The compiled grammar of `output` (xgrammar caches it per schema). Raises StructuredOutputError
        naming the schema's problem (an unknown type, a bad pattern, a $ref to nowhere, ...)."""
        return _compile(self._engine(), output.schema if output.schema is not None else _ANY_OBJECT)

    def row(self, output: OutputFormat) -> RowConstraint:
        """A fresh matcher for one request (compiling the grammar if not cached)."""
        return RowConstraint(_import_xgrammar().GrammarMatcher(self.compile(output)))

    def mask(self, constraints: list[RowConstraint | None], logits: torch.Tensor) -> torch.Tensor:
        """`logits` (B, V), row i of request i, with the tokens each constrained row cannot take at -inf;
        unconstrained rows are left as they are (bit for bit)."""
        rows = [i for i, c in enumerate(constraints) if c is not None and not c.finished]
        if not rows:
            return logits
        bitmask = self._bitmask_for(len(rows))
        self._batch.batch_fill_next_token_bitmask([constraints[i].matcher for i in rows], bitmask)
        # bit k of int32 word w allows token 32w + k; little-endian bytes unpack LSB first to (R, 32W)
        bits = np.unpackbits(bitmask[: len(rows)].numpy().view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits[:, : logits.shape[-1]]).view(torch.bool).to(logits.device)  # (R, V)
        if len(rows) == logits.shape[0]:  # every row constrained: one pass over the logits
            return torch.where(allowed, logits, float("-inf"))
        index = torch.tensor(rows, device=logits.device)
        chosen = torch.where(allowed, logits.index_select(0, index), float("-inf"))  # (R, V)
        return logits.index_copy(0, index, chosen)

    def _bitmask_for(self, rows: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = _import_xgrammar().allocate_token_bitmask(max(rows, 8), self.vocab_size)
        return self._bitmask

    @staticmethod
    def advance(constraints: list[RowConstraint | None], tokens: list[int]) -> None:
        """Move each constrained row's matcher by the token it took."""
        for constraint, token in zip(constraints, tokens, strict=True):
            if constraint is not None and not constraint.finished:
                constraint.accept(token)

    def complete(self, constraint: RowConstraint) -> bool:
        """Whether the row's JSON is complete: its grammar allows nothing but a stop token next (so the
        request can finish now, without a step that could only choose the stop token)."""
        if constraint.finished or not constraint.matcher.is_completed():
            return False
        bitmask = self._bitmask_for(1)
        constraint.matcher.fill_next_token_bitmask(bitmask, 0)
        bits = np.unpackbits(bitmask[:1].numpy().view(np.uint8), axis=-1, bitorder="little")
        return set(np.flatnonzero(bits[0]).tolist()) <= self.stop_ids


def _compile(compiler, schema: str):
    try:
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS)
    except (RuntimeError, ValueError, TypeError) as error:
        message = _ENGINE_NOISE.sub("", str(error).strip().splitlines()[0] if str(error).strip() else "")
        raise StructuredOutputError(f"the JSON Schema cannot be enforced: {message or type(error).__name__}. "
                                    "Fix the schema (types: object, array, string, number, integer, "
                                    "boolean, null; $ref within the schema).") from None


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputError(f"structured output needs the grammar engine: {INSTALL_HINT}.") from None
    return xgrammar


__all__ = ["INSTALL_HINT", "Constraints", "OutputFormat", "RowConstraint", "StructuredOutputError",
           "parse_response_format", "read_json_schema", "structured_output_available"]
