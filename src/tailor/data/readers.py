"""Read the files people hold their data in, as (number, record) pairs: JSONL or a JSON array, CSV,
parquet, a dataset saved with Hugging Face `datasets` (`save_to_disk`), or a directory of such files.

Each reader returns the records with where they came from (a line of a text file, a row of a table) and
the problems it found, never raising on bad content; tailor.data.load turns records into Examples.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.data.errors import DataIssue

TEXT_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".parquet")
DATA_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
# the files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write beside the arrow shards
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DATASETS_EXTRA = "pip install 'tailor[datasets]'"


@dataclass
class Records:
    """The records of one file (or dataset): `name` is what errors call it, `unit` what numbers count."""

    name: str
    unit: str = "line"
    records: list[tuple[int, Any]] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def read_path(path: Path, split: str | None = None) -> list[Records]:
    """The records under `path`: one file, a saved dataset (its `split`, default train), or each data
    file of a directory in name order. Problems that concern the whole path are issues of its Records."""
    if is_saved_dataset(path):
        return [_read_saved_dataset(path, split)]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            return [Records(str(path), issues=[DataIssue(
                str(path), "is a directory with no data files in it.",
                f"put {', '.join(DATA_SUFFIXES)} files in it, or give a dataset saved with "
                "datasets' save_to_disk, or one file.")])]
        return [read_file(p) for p in files]
    return [read_file(path)]


def read_file(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    records, issues = read_records(path)  # JSONL / a JSON array (any other suffix is read as JSONL)
    return Records(str(path), "line", records, issues)


def _read_csv(path: Path) -> Records:
    """A CSV file with a header row; each record is numbered by the line it ends on. A `messages` cell
    holds the conversation as JSON text."""
    out = Records(str(path), "line")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                record: dict[str, Any] = {k: v for k, v in row.items() if k is not None}
                if None in row:
                    extra = len(row[None])
                    out.issues.append(DataIssue(out.name, f"has {extra} more cell(s) than the header has "
                                                "columns.", "quote cells that hold commas.",
                                                line=reader.line_num))
                    continue
                messages = record.get("messages")
                if isinstance(messages, str) and messages.lstrip().startswith("["):
                    try:
                        record["messages"] = json.loads(messages)
                    except json.JSONDecodeError as error:
                        out.issues.append(DataIssue(out.name, f"is not valid JSON ({error.msg}).",
                                                    "write the conversation as a JSON array.",
                                                    line=reader.line_num, field="messages"))
                        continue
                out.records.append((reader.line_num, record))
    except UnicodeDecodeError as error:
        out.issues.append(DataIssue(out.name, f"is not UTF-8 text ({error.reason} at byte {error.start}).",
                                    "save the file as UTF-8 CSV."))
    except csv.Error as error:
        out.issues.append(DataIssue(out.name, f"is not valid CSV ({error}).", "fix the quoting of this row.",
                                    line=reader.line_num))
    except OSError as error:
        out.issues.append(DataIssue(out.name, f"cannot be read ({error.strerror or error}).",
                                    "check that the file exists and that you may read it."))
    return out


def _read_parquet(path: Path) -> Records:
    out = Records(str(path), "row")
    if importlib.util.find_spec("pyarrow") is None:
        out.issues.append(DataIssue(out.name, "is a parquet file, and reading parquet needs pyarrow.",
                                    DATASETS_EXTRA + " (or pip install pyarrow)."))
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        out.issues.append(DataIssue(out.name, f"cannot be read as parquet ({error}).",
                                    "check the file (pyarrow.parquet.read_table must read it)."))
        return out
    out.records = list(enumerate(rows, start=1))
    return out


def _read_saved_dataset(path: Path, split: str | None) -> Records:
    """A dataset saved with `datasets` (`save_to_disk`): a Dataset, or a DatasetDict's `split`."""
    out = Records(str(path), "row")
    if importlib.util.find_spec("datasets") is None:
        out.issues.append(DataIssue(out.name, "is a dataset saved with Hugging Face datasets, which is not "
                                    "installed.", DATASETS_EXTRA + "."))
        return out
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or "train"
        if chosen not in loaded:
            out.issues.append(DataIssue(out.name, f"has no split {chosen!r} (it has {', '.join(loaded)}).",
                                        "name one with split: in the data source."))
            return out
        loaded = loaded[chosen]
        out.name = f"{path}[{chosen}]"
    out.records = list(enumerate(loaded.to_list(), start=1))
    return out


def read_records(path: Path) -> tuple[list[tuple[int, Any]], list[DataIssue]]:
    """Parse a JSONL file or a JSON array file into (line, value) pairs plus the parse problems found."""
    name = str(path)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        return [], [DataIssue(name, f"is not UTF-8 text ({err.reason} at byte {err.start}).",
                              "save the file as UTF-8 JSONL.")]
    except OSError as err:  # permission denied, a directory, an I/O error: say which, never a traceback
        return [], [DataIssue(name, f"cannot be read ({err.strerror or err}).",
                              "check that the file exists and that you may read it (ls -l), or give "
                              "another file.")]
    if content.lstrip().startswith("["):
        return _read_json_array(name, content)
    records, issues = [], []
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append((number, json.loads(raw)))
        except json.JSONDecodeError as err:
            issues.append(DataIssue(
                name, f"not valid JSON ({err.msg} at column {err.colno}).",
                "each line must hold one complete JSON object (JSONL); a pretty-printed file must be "
                "one JSON array of objects.", line=number))
    return records, issues


def _read_json_array(name: str, content: str) -> tuple[list[tuple[int, Any]], list[DataIssue]]:
    """Decode a top-level JSON array element by element, so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    position = content.index("[") + 1
    while True:
        while position < len(content) and content[position] in " \t\r\n,":
            position += 1
        if position >= len(content):
            issue = DataIssue(name, "JSON array is not closed (missing ']').", "close the array with ']'.",
                              line=content.count("\n") + 1)
            return records, [issue]
        if content[position] == "]":
            rest = content[position + 1:].strip()
            if rest:
                line = content.count("\n", 0, position) + 2
                return records, [DataIssue(name, "unexpected text after the closing ']'.",
                                           "a JSON file must hold exactly one array.", line=line)]
            return records, []
        line = content.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(content, position)
        except json.JSONDecodeError as err:
            return records, [DataIssue(name, f"not valid JSON ({err.msg} at column {err.colno}).",
                                       "fix the JSON syntax of this array element.", line=err.lineno)]
        records.append((line, value))


__all__ = ["DATA_SUFFIXES", "Records", "is_saved_dataset", "read_file", "read_path", "read_records"]
