"""Data from disk: the same records as JSONL, CSV, parquet, a saved `datasets` dataset and a directory load
as the same examples; columns map a file's names to the format's; several sources mix by weight, exactly
and deterministically; bad files are named by file, line or row, and column."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter

import pytest
from conftest import tiny_model_dir, write_arithmetic_jsonl

from tailor.config import ConfigError
from tailor.data import DataError, load_examples
from tailor.data.sources import data_record, load_sources, mix, mixture_counts, parse_sources
from tailor.train import TrainConfig, train

pq = pytest.importorskip("pyarrow.parquet", reason="parquet needs pyarrow (tailor[datasets])")
datasets = pytest.importorskip("datasets", reason="saved datasets need tailor[datasets]")

QA = [{"question": f"add {i % 10} {(i * 7) % 10}", "answer": str(i % 10 + (i * 7) % 10)} for i in range(30)]


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def messages(examples):
    return [e.messages for e in examples]


def test_every_kind_of_file_loads_the_same_examples(tmp_path):
    rows = [{"prompt": r["question"], "completion": r["answer"]} for r in QA]
    reference = tmp_path / "ref.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = messages(load_examples(reference))
    assert len(expected) == 30 and expected[0] == [{"role": "user", "content": "add 0 0"},
                                                   {"role": "assistant", "content": "0"}]
    assert messages(load_examples(write_csv(tmp_path / "d.csv", rows))) == expected
    assert messages(load_examples(write_parquet(tmp_path / "d.parquet", rows))) == expected
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert messages(load_examples(tmp_path / "saved")) == expected
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                          "test": datasets.Dataset.from_list(rows[20:])}).save_to_disk(str(tmp_path / "dict"))
    assert messages(load_examples(tmp_path / "dict")) == expected[:20]
    assert messages(load_examples(tmp_path / "dict", split="test")) == expected[20:]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_parquet(folder / "a.parquet", rows[:10])
    write_csv(folder / "b.csv", rows[10:25])
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[25:]))
    (folder / "notes.txt").write_text("not data")
    assert messages(load_examples(folder)) == expected  # name order: a, b, c


def test_columns_map_a_files_names_to_the_formats(tmp_path):
    expected = messages(load_examples(write_parquet(tmp_path / "pc.parquet", [
        {"prompt": r["question"], "completion": r["answer"]} for r in QA])))
    mapping = {"prompt": "question", "completion": "answer"}
    assert messages(load_examples(write_parquet(tmp_path / "qa.parquet", QA), columns=mapping)) == expected
    assert messages(load_examples(write_csv(tmp_path / "qa.csv", QA), columns=mapping)) == expected


def test_bad_rows_are_named_by_file_line_or_row_and_column(tmp_path):
    mapping = {"prompt": "question", "completion": "answer"}
    rows = [dict(r) for r in QA[:5]]
    rows[2]["answer"] = ""
    with pytest.raises(DataError) as error:
        load_examples(write_csv(tmp_path / "qa.csv", rows), columns=mapping)
    # the header is line 1, so the third record is line 4
    assert str(error.value).startswith(f"{tmp_path / 'qa.csv'}:4: field 'answer': is empty.")
    rows[2]["answer"] = None
    with pytest.raises(DataError) as error:
        load_examples(write_parquet(tmp_path / "qa.parquet", rows), columns=mapping)
    assert str(error.value).startswith(
        f"{tmp_path / 'qa.parquet'} row 3: field 'answer': must be a string, got null")
    no_column = r"qa.parquet row 1: has no column 'query' \(columns maps prompt to it; this record has "
    with pytest.raises(DataError, match=no_column + r"answer, question\)"):
        load_examples(tmp_path / "qa.parquet", columns={"prompt": "query", "completion": "answer"})
    no_field = "columns maps to 'question', which no data format has.*map to one of: messages, instruction"
    with pytest.raises(DataError, match=no_field):
        load_examples(tmp_path / "qa.parquet", columns={"question": "prompt"})
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot be read as parquet"):
        load_examples(tmp_path / "broken.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"has no split 'test' \(it has train\)"):
        load_examples(tmp_path / "dict", split="test")


def test_sources_are_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError) as error:
        TrainConfig(data=[{"path": "a.jsonl", "weight": 0}, {"file": "b.jsonl"}]).validate()
    text = str(error.value)
    assert "data[0].weight: 0 must be a number > 0" in text
    assert "data[1]: unknown key(s) file; a source takes path, weight, columns, format, split" in text
    assert parse_sources("a.jsonl")[0][0].path == "a.jsonl"


def test_mixing_matches_the_weights_and_the_seed(tmp_path):
    assert mixture_counts([0.7, 0.3], 1000) == [700, 300]
    assert mixture_counts([1, 1, 1], 1000) == [334, 333, 333]
    a = write_arithmetic_jsonl(tmp_path / "a.jsonl", n=400)
    b = write_arithmetic_jsonl(tmp_path / "b.jsonl", n=600, offset=1000)
    sources = [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}]
    train, validation = load_sources(sources, None, 0.0, seed=3)
    assert len(train) == 1000 and validation == []
    from_a = sum(e.source.startswith(str(a)) for e in train)
    assert abs(from_a / 1000 - 0.7) <= 0.02  # exact here: 700
    assert [e.source for e in load_sources(sources, None, 0.0, seed=3)[0]] == [e.source for e in train]
    assert [e.source for e in load_sources(sources, None, 0.0, seed=4)[0]] != [e.source for e in train]
    # a source with fewer examples than its share is repeated, in a seeded order
    small = load_examples(write_arithmetic_jsonl(tmp_path / "s.jsonl", n=10))
    other = load_examples(write_arithmetic_jsonl(tmp_path / "o.jsonl", n=90, offset=100))
    mixed, counts = mix([small, other], [0.5, 0.5], seed=0)
    assert counts == [50, 50]
    assert Counter(e.source for e in mixed if e.source.startswith(str(tmp_path / "s.jsonl"))) == \
        {e.source: 5 for e in small}  # five whole passes over the small source
    record = data_record(sources, None, (train, validation))
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert [s["sha256"] for s in record["sources"]] == digests
    assert [(s["weight"], s["drawn"]) for s in record["sources"]] == [(0.7, 700), (0.3, 300)]


def test_a_run_trains_on_parquet_csv_and_a_saved_dataset_mixed(tmp_path, one_thread):
    model = tiny_model_dir(tmp_path / "model")
    write_parquet(tmp_path / "qa.parquet", QA)
    write_csv(tmp_path / "pc.csv", [{"prompt": r["question"], "completion": r["answer"]} for r in QA])
    datasets.Dataset.from_list([{"prompt": r["question"], "completion": r["answer"]} for r in QA]) \
        .save_to_disk(str(tmp_path / "saved"))
    data = [{"path": str(tmp_path / "qa.parquet"), "weight": 2, "columns": {"prompt": "question",
                                                                              "completion": "answer"}},
            {"path": str(tmp_path / "pc.csv"), "weight": 1}, {"path": str(tmp_path / "saved"), "weight": 1}]
    config = TrainConfig(model=str(model), data=data, method="lora", rank=4, precision="fp32", max_steps=2,
                         batch_size=4, progress=False, out=str(tmp_path / "run"))
    run = train(config)
    summary = json.loads((run / "summary.json").read_text())
    sources = summary["data_sources"]["sources"]
    assert [s["drawn"] for s in sources] == [41, 20, 20]  # 81 training examples (3 x 27), weights 2:1:1
    assert sources[0]["sha256"] == hashlib.sha256((tmp_path / "qa.parquet").read_bytes()).hexdigest()
    assert summary["data"]["train"]["n_in"] == 81 and summary["data"]["validation"]["n_in"] == 9
