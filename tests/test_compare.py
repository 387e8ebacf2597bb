"""`tailor compare` and `tailor sweep`: method names, the decision rule, and real runs on a tiny model
(each method in its own process, as users run it)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model_dir, write_arithmetic_jsonl
from typer.testing import CliRunner

from tailor.cli import app
from tailor.compare import parse_entries
from tailor.compare.runner import decide
from tailor.files import directory_size


def test_method_names_and_rank_scaling():
    entries = parse_entries("zero-shot,few-shot,full,lora,lora-r64,qlora-r8,qlora-int8", {"rank": 16,
                                                                                         "lora_alpha": 32},
                            shots=5, method_overrides={"full": {"lr": 1e-4}})
    by = {e.label: e for e in entries}
    assert [e.trains for e in entries] == [False, False, True, True, True, True, True]
    assert by["few-shot"].shots == 5 and by["zero-shot"].shots == 0
    assert by["full"].overrides == {"method": "full", "lr": 1e-4}
    assert by["lora"].overrides == {"method": "lora"}
    assert by["lora-r64"].overrides == {"method": "lora", "rank": 64, "lora_alpha": 128.0}  # alpha/r kept
    assert by["qlora-r8"].overrides == {"method": "qlora-nf4", "rank": 8, "lora_alpha": 16.0}
    assert by["qlora-int8"].overrides == {"method": "qlora-int8"}

    # DoRA is LoRA with use_dora, its rank scaled like LoRA's
    by = {e.label: e for e in parse_entries("lora-r16,dora,dora-r8", {"rank": 16, "lora_alpha": 32})}
    assert by["dora"].method == "lora" and by["dora"].overrides == {"method": "lora", "use_dora": True}
    assert by["dora-r8"].overrides == {"method": "lora", "use_dora": True, "rank": 8, "lora_alpha": 16.0}
    assert "use_dora" not in by["lora-r16"].overrides

    # a full fine-tune has no frozen base to hold replayed answers to: it replays them with ce
    entries = parse_entries("full,lora", {"replay_ratio": 0.4, "replay_loss": "kl"})
    kl = {e.label: e.overrides for e in entries}
    assert kl == {"full": {"method": "full", "replay_loss": "ce"}, "lora": {"method": "lora"}}


@pytest.mark.parametrize("text", ["lora-r", "vera", "full-r8", "lora,lora", "dora,dora-r16,dora"])
def test_unknown_or_repeated_method_lists_valid_names(text):
    with pytest.raises(ValueError, match="zero-shot, few-shot, full|twice"):
        parse_entries(text, {})


def test_decision_is_the_cheapest_within_the_margin():
    rows = [
        {"method": "full", "field_accuracy": 0.95, "cost_usd": 3.0, "artifact_bytes": 500},
        {"method": "lora-r64", "field_accuracy": 0.94, "cost_usd": 1.0, "artifact_bytes": 50},
        {"method": "lora-r4", "field_accuracy": 0.935, "cost_usd": 1.0, "artifact_bytes": 5},
        {"method": "few-shot", "field_accuracy": 0.40, "cost_usd": 0.0, "artifact_bytes": 0},
        {"method": "qlora", "error": "boom", "cost_usd": 0.0},
    ]
    decision = decide(rows, margin=0.02)
    assert decision["method"] == "lora-r4" and decision["best_method"] == "full"  # tie on cost: smaller
    assert decide(rows, margin=0.6)["method"] == "few-shot"
    assert decide(rows, margin=0.0)["method"] == "full"


def _peft_trainable(rank: int) -> int:
    from conftest import tiny_llama
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    return model.get_nb_trainable_parameters()[0]


def _tiny_setup(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=32)
    val = write_arithmetic_jsonl(tmp_path / "val.jsonl", n=6, offset=100)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {model}\ndata: {data}\nval_data: {val}\nmax_steps: 3\nbatch_size: 4\n"
                      "rank: 4\nlora_alpha: 8\nlr: 1.0e-3\nnum_threads: 1\neval_every: 1\nmax_seq_len: 64\n")
    return config, val


@pytest.mark.slow
def test_compare_runs_each_method_and_reports(tmp_path):
    config, val = _tiny_setup(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "zero-shot,few-shot,lora-r2,full",
                                      "--out", str(out), "--shots", "2", "--full-lr", "-1",
                                      "--price-per-hour", "3.6"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == ["zero-shot", "few-shot", "lora-r2", "full"]
    assert "lr" in rows["full"]["error"]  # a method that fails is a row with its error; the rest is kept
    for name in ("zero-shot", "few-shot", "lora-r2"):
        row = rows[name]
        assert row.get("error") is None, row.get("error")
        for key in ("exact_match", "retention", "val_loss", "train_seconds", "peak_rss_bytes",
                    "frozen_weight_bytes", "trainable_params", "artifact_bytes", "cost_usd"):
            assert row[key] is not None, (name, key)
        assert row["n"] == 6
        assert row["off_task"] is None  # plain-text answers: no task format to answer in
    lora = rows["lora-r2"]
    adapter = tmp_path / "report" / "lora-r2" / "run" / "adapter"
    assert lora["artifact_bytes"] == directory_size(adapter) > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    assert lora["trainable_params"] == _peft_trainable(rank=2)  # the reference count
    assert lora["cost_usd"] == pytest.approx(lora["train_seconds"] / 3600 * 3.6, rel=1e-3)
    assert rows["zero-shot"]["train_seconds"] == 0 and rows["zero-shot"]["trainable_params"] == 0
    html = (out / "compare.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    assert (out / "val_loss.png").stat().st_size > 0 and "Decision" in (out / "compare.md").read_text()
    assert report["decision"]["method"] in rows


@pytest.mark.slow
def test_sweep_writes_the_best_config(tmp_path):
    config, _ = _tiny_setup(tmp_path)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(config), "--grid", "rank=2,4", "--grid", "lr=1e-3,1e-2",
                                      "--sample", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["runs"]) == 3
    losses = {r["method"]: r["final_val_loss"] for r in sweep["runs"]}
    assert sweep["best"] == min(losses, key=losses.get)
    best = next(r for r in sweep["runs"] if r["method"] == sweep["best"])
    from tailor.config import load_config

    written = load_config(out / "best.yaml")
    assert written.rank == best["settings"]["rank"] and written.lr == best["settings"]["lr"]


def test_report_dir_that_holds_other_files_is_refused(tmp_path):
    config, _ = _tiny_setup(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for out in (tmp_path / "taken", tmp_path / "taken" / "notes.txt"):
        result = CliRunner().invoke(app, ["compare", str(config), "--methods", "zero-shot",
                                          "--out", str(out)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(out) in result.output.replace("\n", "")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]


def test_pissa_names_are_lora_with_pissa_init():
    entries = parse_entries("lora-r16,pissa,pissa-r8", {"rank": 16, "lora_alpha": 32},
                            method_overrides={"lora": {"lr": 1e-4}})
    by = {e.label: e.overrides for e in entries}
    assert by["pissa"] == {"method": "lora", "init_lora_weights": "pissa", "lr": 1e-4}
    assert by["pissa-r8"] == {"method": "lora", "init_lora_weights": "pissa", "lr": 1e-4, "rank": 8,
                              "lora_alpha": 16.0}
    from tailor.config import TrainConfig

    TrainConfig(data="builtin:support", **by["pissa-r8"]).validate()  # a config the run accepts


def test_pissa_and_full_entries_replay_with_cross_entropy_under_a_kl_recipe():
    # the demo recipe replays with a KL to the base under the adapter, which a full fine-tune moves and PiSSA
    # leaves only the residual of: those entries replay with cross-entropy instead (the run would refuse kl)
    base = {"data": "builtin:support", "rank": 16, "lora_alpha": 32, "replay_ratio": 0.4, "replay_loss": "kl"}
    by = {e.label: e.overrides for e in parse_entries("lora-r16,pissa-r16,full,dora-r16", base)}
    assert [by[name].get("replay_loss") for name in ("lora-r16", "pissa-r16", "full", "dora-r16")] == \
        [None, "ce", "ce", None]
    from tailor.config import TrainConfig

    TrainConfig(**{**base, **by["pissa-r16"]}).validate()
