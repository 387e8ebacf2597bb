"""Read training data people already have (JSONL or a JSON array) and normalise it to Example.

Formats (detected from the first record's keys, overridable with ``format=``):

- chat:              {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI)
- alpaca:            {"instruction": "...", "input": "..." (optional), "output": "...", "system": (optional)}
- prompt_completion: {"prompt": "...", "completion": "..."}
- text:              {"text": "..."}                         (plain language modelling, loss on every token)

chat, alpaca and prompt_completion become ``Example.messages``; text becomes ``Example.text``.
Every problem in a file is collected and raised as one DataError naming file, line, field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor.data.errors import DataError, DataIssue
from tailor.data.example import Example
from tailor.data.readers import read_path, read_records

__all__ = ["Example", "FORMATS", "ROLES", "detect_format", "load_examples", "read_records"]

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
BUILTIN_PREFIX = "builtin:"

# (required, optional) fields per format, in the order people write them.
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
_EXAMPLE_RECORD = {
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "alpaca": '{"instruction": "Translate to French", "input": "cat", "output": "chat"}',
    "prompt_completion": '{"prompt": "2+2=", "completion": "4"}',
    "text": '{"text": "Once upon a time..."}',
}


def _fields_doc(fmt: str) -> str:
    required, optional = _FIELDS[fmt]
    return ", ".join([*required, *(f"{name} (optional)" for name in optional)])


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys point to, or None when they match none."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or {"input", "output"} <= keys:
        return "alpaca"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class _RecordChecker:
    """Normalises one record of a known format into an Example, collecting issues instead of raising."""

    def __init__(self, path: str, line: int, issues: list[DataIssue]):
        self.path, self.line, self.issues = path, line, issues

    def issue(self, problem: str, fix: str, field: str | None = None) -> None:
        self.issues.append(DataIssue(self.path, problem, fix, line=self.line, field=field))

    def string(self, record: dict, field: str, *, required: bool = True,
               non_empty: bool = True) -> str | None:
        if field not in record or (not required and record[field] is None):  # optional null = absent
            if required:
                self.issue("is missing.", f"add it (this format expects: {self._expected}), or pass "
                           "format= to choose another format.", field)
            return None
        value = record[field]
        if not isinstance(value, str):
            self.issue(f"must be a string, got {_type_name(value)} ({json.dumps(value)[:40]}).",
                       "write the value as a JSON string.", field)
            return None
        if non_empty and not value.strip():
            self.issue("is empty.", "fill it in or remove this record.", field)
            return None
        return value

    def normalise(self, record: dict, fmt: str) -> Example | None:
        self._expected = _fields_doc(fmt)
        n_issues = len(self.issues)
        source = f"{self.path}:{self.line}"
        if fmt == "text":
            text = self.string(record, "text")
            return Example(None, text, source) if len(self.issues) == n_issues else None
        if fmt == "chat":
            messages = self.messages(record)
        elif fmt == "alpaca":
            instruction = self.string(record, "instruction")
            extra = self.string(record, "input", required=False, non_empty=False)
            system = self.string(record, "system", required=False)
            output = self.string(record, "output")
            user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        else:
            prompt, completion = self.string(record, "prompt"), self.string(record, "completion")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Example(messages, None, source) if len(self.issues) == n_issues else None

    def messages(self, record: dict) -> list[dict[str, str]] | None:
        if "messages" not in record:
            self.string(record, "messages")  # reports the missing field
            return None
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            got = "an empty array" if raw == [] else _type_name(raw)
            self.issue(f"must be a non-empty array of {{role, content}} objects, got {got}.",
                       f"write it like {_EXAMPLE_RECORD['chat']}.", "messages")
            return None
        messages = []
        for index, message in enumerate(raw):
            field = f"messages[{index}]"
            if not isinstance(message, dict):
                self.issue(f"must be an object with 'role' and 'content', got {_type_name(message)}.",
                           'write it like {"role": "user", "content": "..."}.', field)
                continue
            role, content = message.get("role"), message.get("content")
            if "role" not in message or "content" not in message:
                missing = [key for key in ("role", "content") if key not in message]
                self.issue(f"is missing {' and '.join(repr(k) for k in missing)}.",
                           'each message needs {"role": ..., "content": ...}.', field)
                continue
            if role not in ROLES:
                self.issue(f"unknown role {role!r}.", f"use one of: {', '.join(ROLES)}.", f"{field}.role")
                continue
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                content = "".join(p for p in parts if isinstance(p, str)) if parts else content
            if not isinstance(content, str):
                self.issue(f"must be a string, got {_type_name(content)}.",
                           "write the content as a JSON string.", f"{field}.content")
                continue
            if role == "system" and index != 0:
                self.issue("a system message may only come first.", "move it to the start or drop it.", field)
                continue
            if role == "assistant" and not content.strip():
                self.issue("assistant message is empty.", "fill it in or remove the message.",
                           f"{field}.content")
                continue
            messages.append({"role": role, "content": content})
        if len(messages) == len(raw) and not any(m["role"] == "assistant" for m in messages):
            self.issue("has no assistant message, so there is nothing to learn.",
                       "add the answer as {\"role\": \"assistant\", \"content\": \"...\"}.", "messages")
        return messages


def load_examples(path_or_spec: str | Path, format: str = "auto", columns: dict[str, str] | None = None,
                  split: str | None = None) -> list[Example]:
    """Load data people hold (or a "builtin:..." spec) as normalised Examples.

    A path is a JSONL / JSON-array, CSV or parquet file, a dataset saved with Hugging Face datasets'
    `save_to_disk` (its `split`, default train), or a directory of such files (in name order). Specs:
    "builtin:NAME" (a built-in task's train split, tailor.data.tasks: support, code, analysis, voice) and
    "builtin:NAME:train|validation|test". ``format`` is one of auto|alpaca|chat|prompt_completion|text.
    ``columns`` maps the format's field names to the file's column names:
    {"prompt": "question", "completion": "answer"}.

    Raises:
        DataError: not found, empty, unreadable, records of the wrong shape; all problems listed at once,
            each with its file, line or row, and field (column).
    """
    spec = str(path_or_spec)
    if format != "auto" and format not in FORMATS:
        raise DataError(DataIssue(spec, f"unknown format {format!r}.",
                                  f"use one of: auto, {', '.join(FORMATS)}."))
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec)
    path = Path(spec).expanduser()
    if not path.is_file() and not path.is_dir():
        raise DataError(_not_a_data_file(spec, path))
    issues = column_problems(spec, columns)
    if issues:
        raise DataError(issues)
    examples: list[Example] = []
    for part in read_path(path, split):
        issues += part.issues
        if not part.records and not part.issues:
            issues.append(DataIssue(part.name, "the file is empty (no JSON records)." if part.unit == "line"
                                    else "has no rows.",
                                    "add one JSON object per line, e.g. " + _EXAMPLE_RECORD["chat"]))
        examples += _examples_of(part, format, columns or {}, issues)
    if issues:
        raise DataError(issues)
    return examples


# every field a record of some format can hold: what `columns` may map to
RECORD_FIELDS = tuple(dict.fromkeys(name for required, optional in _FIELDS.values()
                                    for name in (*required, *optional)))


def column_problems(spec: str, columns: dict[str, str] | None) -> list[DataIssue]:
    """A `columns` mapping that maps to no field of any format, or from something that is not a column."""
    issues = []
    for target, column in (columns or {}).items():
        if target not in RECORD_FIELDS:
            issues.append(DataIssue(spec, f"columns maps to {target!r}, which no data format has.",
                                    f"map to one of: {', '.join(RECORD_FIELDS)} (e.g. columns: "
                                    "{prompt: question, completion: answer})."))
        elif not isinstance(column, str) or not column:
            issues.append(DataIssue(spec, f"columns: {target}: {column!r} is not a column name.",
                                    "give the file's column name as text."))
    return issues


def _examples_of(part: Any, format: str, columns: dict[str, str], issues: list[DataIssue]) -> list[Example]:
    """Normalise one file's records; problems go to `issues` (named by the file's own column names)."""
    spec, unit = part.name, part.unit
    renamed = {column: target for target, column in columns.items()}
    fmt, first_line = (format, None) if format != "auto" else (None, None)
    examples = []
    for line, record in part.records:
        found: list[DataIssue] = []
        checker = _RecordChecker(spec, line, found)
        if not isinstance(record, dict):
            checker.issue(f"must be a JSON object, got {_type_name(record)}.",
                          "write one object per record, e.g. " + _EXAMPLE_RECORD["chat"])
        else:
            if columns:
                missing = [c for c in renamed if c not in record]
                if missing:
                    checker.issue(f"has no column {missing[0]!r} (columns maps {renamed[missing[0]]} to it; "
                                  f"this record has {', '.join(sorted(map(str, record)))}).",
                                  "fix the name in columns:.")
                record = {renamed.get(k, k): v for k, v in record.items()}
            if fmt is None and not found:
                fmt, first_line = detect_format(record), line
                if fmt is None:
                    raise DataError(DataIssue(
                        spec, f"cannot tell the data format from the keys {sorted(record)}.",
                        "use one of: " + "; ".join(f"{f} ({_fields_doc(f)})" for f in FORMATS)
                        + "; or pass format=, or map your columns (columns: {prompt: question, ...}).",
                        line=line, unit=unit))
            other = detect_format(record)
            if (not found and first_line is not None and any(k not in record for k in _FIELDS[fmt][0])
                    and other is not None and other != fmt):
                checker.issue(f"looks like format {other!r}, but {unit} {first_line} made the file {fmt!r}.",
                              "use one format per file (or pass format=).")
            elif not found:
                example = checker.normalise(record, fmt)
                if example is not None:
                    examples.append(example)
        issues += [_in_file_terms(issue, unit, columns) for issue in found]
    return examples


def _in_file_terms(issue: DataIssue, unit: str, columns: dict[str, str]) -> DataIssue:
    """An issue as the user's file spells it: its rows, and its own column for a mapped field."""
    from dataclasses import replace

    field = issue.field
    if field is not None:
        head, _, rest = field.partition("[") if "[" in field else field.partition(".")
        if head in columns:
            field = f"{columns[head]}{'[' if '[' in field else '.' if rest else ''}{rest}"
    return replace(issue, field=field, unit=unit)


def _not_a_data_file(spec: str, path: Path) -> DataIssue:
    """Why `path` (neither a file nor a directory) cannot be read as data, and what to give instead."""
    fix = ("give the path to a data file (.jsonl, .json, .csv, .parquet), a directory of them, a dataset "
           "saved with datasets' save_to_disk, or a built-in dataset such as builtin:support.")
    if path.exists():  # a FIFO, a socket, a device: reading it could block forever
        return DataIssue(spec, "is not a regular file (a pipe, socket or device).", fix)
    return DataIssue(spec, "not found.", fix.rstrip(".") + " (check the spelling and the working directory).")


def _load_builtin(spec: str) -> list[Example]:
    from tailor.data.tasks import SPLITS, TASKS, builtin_specs  # lazily: generators only for builtin specs

    parts = spec[len(BUILTIN_PREFIX):].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    if name not in TASKS or len(parts) > 2 or split not in SPLITS:
        raise DataError(DataIssue(spec, "unknown built-in dataset.",
                                  f"use one of: {', '.join(builtin_specs())} (`tailor data list` describes "
                                  "the tasks)."))
    return TASKS[name].build(split)
