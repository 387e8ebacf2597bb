"""`tailor eval RUN --safety` end to end: a tiny model trained with canaries (plumbing: every probe answered
by both sides, checked, written to eval.json and the report), a bad probe file refused before any work,
and the default model under an adapter that changes nothing (slow): the tuned side answers as the base."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model_dir, write_arithmetic_jsonl
from typer.testing import CliRunner

from tailor.cli import app
from tailor.eval.safety import BUILTIN_PROBES, default_voice_rules, read_probes
from tailor.eval.safety_checks import run_check
from tailor.train import load_config, train


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = tiny_model_dir(root / "model")
    data = write_arithmetic_jsonl(root / "train.jsonl")
    config = load_config(model=str(model), data=str(data), out=str(root / "run"), max_steps=2, batch_size=4,
                         rank=4, progress=False, num_threads=1, canaries=3, precision="fp32")
    train(config)
    return root


@pytest.mark.usefixtures("one_thread")
def test_cli_eval_safety_writes_every_probe(canary_run, tmp_path):
    extra = tmp_path / "mine.jsonl"
    extra.write_text(json.dumps({"prompt": "add 1 2", "check": {"type": "regex", "pattern": "3"},
                                 "category": "arithmetic", "id": "mine-1"}) + "\n")
    run = canary_run / "run"
    (run / "eval.json").write_text(json.dumps({"n": 5, "kept": "what eval.json held stays"}))
    result = CliRunner().invoke(app, ["eval", str(run), "--safety", "--probes", str(extra), "--dtype",
                                      "float32", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    written = json.loads((run / "eval.json").read_text())
    assert written["kept"] == "what eval.json held stays"
    safety = written["safety"]
    builtin = read_probes(BUILTIN_PROBES)
    voiced = default_voice_rules() is not None
    expected = len([p for p in builtin if voiced or p.check["type"] != "voice"]) + 3 + 1
    assert safety["n"] == len(safety["probes"]) == expected
    assert safety["sources"] == ["built-in", str(run / "canaries.json"), str(extra)]
    assert ("voice" in safety["skipped"]) is not voiced
    assert safety["categories"]["pii"]["n"] == 3 and safety["categories"]["arithmetic"]["n"] == 1
    assert safety["leakage"]["n"] == 3  # a random tiny model reproduces no 16-digit secret
    assert safety["leakage"]["base"] == 0.0
    # each verdict is the check applied to the answer written (answers of 64 tokens: kept whole)
    for probe in safety["probes"]:
        check = next(p.check for p in [*builtin, *read_probes(run / "canaries.json"), *read_probes(extra)]
                     if p.id == probe["id"])
        for side in ("base", "tuned"):
            verdict = run_check(probe[side]["answer"], check, default_voice_rules())
            assert verdict.passed == probe[side]["passed"], probe
    for name, category in safety["categories"].items():
        rows = [p for p in safety["probes"] if p["category"] == name]
        assert category["tuned"] == sum(p["tuned"]["passed"] for p in rows) / len(rows)
    report = (run / "report.md").read_text()
    assert "## Safety" in report and "Canary leakage: the tuned model reproduces" in report
    assert "Warning: 3 canaries planted" in report
    assert "safety probes" in result.output and "pii" in result.output


def test_bad_probe_file_is_refused_before_the_model_loads(canary_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "check": {"type": "refusal"}}\n'
                   '{"prompt": "y", "check": {"type": "rude"}}\n')
    before = sorted(p.name for p in (canary_run / "run").iterdir())
    result = CliRunner().invoke(app, ["eval", str(canary_run / "run"), "--model", "no/such-model", "--safety",
                                      "--probes", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2: field 'check.type': 'rude' is not a check type" in result.output
    assert "Valid check types: regex, not_regex, refusal" in result.output
    assert sorted(p.name for p in (canary_run / "run").iterdir()) == before


@pytest.mark.slow
def test_default_model_under_a_zero_adapter_answers_as_the_base():
    """LoRA's B starts at zero, so the adapter changes nothing: both sides must give the same answers and
    verdicts, through the two paths (adapters switched off vs on); SmolLM2-Instruct refuses some requests."""
    from tailor.eval.safety import evaluate_safety
    from tailor.lora import LoraConfig, add_lora
    from tailor.models import DEFAULT_MODEL, load_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    probes = [p for p in read_probes(BUILTIN_PROBES) if p.category == "refusal"]
    safety = evaluate_safety(model, tokenizer, probes)
    assert [p["base"] for p in safety["probes"]] == [p["tuned"] for p in safety["probes"]]
    refusal = safety["categories"]["refusal"]
    assert refusal["base"] == refusal["tuned"] > 0
    assert safety["refusals_must_hold"]["rate"] == 1.0


@pytest.mark.usefixtures("one_thread")
def test_evaluate_run_with_safety_writes_both_sections(canary_run, tmp_path):
    """The demo's path (tailor.train.demo): the task comparison and the safety probes in one eval.json."""
    from tailor.eval import evaluate_run

    test = write_arithmetic_jsonl(tmp_path / "test.jsonl", n=2, offset=60)
    out = tmp_path / "eval.json"
    result = evaluate_run(canary_run / "run", data=str(test), retention=False, max_new_tokens=4,
                          batch_size=4, out=out, safety=True, dtype="float32")
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and isinstance(saved["tuned"]["exact_match"], float)
    assert saved["safety"]["categories"]["pii"]["n"] == 3 and result["safety"] == saved["safety"]
    assert {"refusal", "instruction", "hallucination"} <= set(saved["safety"]["categories"])


def test_compare_with_safety_scores_each_method(tmp_path):
    from test_compare import _tiny_setup

    config, _ = _tiny_setup(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "zero-shot,lora-r2", "--out",
                                      str(out), "--safety"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["methods"]
    probes = [p for p in read_probes(BUILTIN_PROBES)
              if default_voice_rules() is not None or p.check["type"] != "voice"]
    for row in rows:
        assert row["safety"]["n"] == len(probes)
        assert set(row["safety"]["categories"]) == {p.category for p in probes}
        assert all(0.0 <= rate <= 1.0 for rate in row["safety"]["categories"].values())
    markdown = (out / "compare.md").read_text()
    assert "## Safety" in markdown and "| zero-shot |" in markdown.split("## Safety")[1]
