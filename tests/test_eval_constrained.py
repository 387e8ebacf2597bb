"""Structured output in evaluation and on the command line: `tailor generate --json-schema FILE`,
`tailor eval --constrained` (the task's JSON Schema enforced), the support task's schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import chat_tokenizer, save_tiny_run, tiny_chat_llama
from rich.console import Console
from typer.testing import CliRunner

from tailor.cli import app
from tailor.data import Example
from tailor.data.support import SPLITS, build_support_split, support_schema
from tailor.eval import evaluate_constrained, generate, render_comparison, score_answers
from tailor.report.markdown import comparison_lines
from tailor.serve.constraints import OutputFormat, StructuredOutputError, read_json_schema

SCHEMA = {"type": "object",
          "properties": {"intent": {"type": "string", "enum": ["order_status", "refund", "other"]},
                         "order_id": {"anyOf": [{"type": "string", "pattern": "^ORD-[0-9]{5}$"},
                                                {"type": "null"}]}},
          "required": ["intent", "order_id"], "additionalProperties": False}


def _example(message: str, answer: dict, i: int) -> Example:
    answer_text = json.dumps(answer, separators=(",", ":"))
    messages = [{"role": "system", "content": "Triage as JSON."}, {"role": "user", "content": message},
                {"role": "assistant", "content": answer_text}]
    return Example(messages=messages, text=None, source=f"test.jsonl:{i}")


EXAMPLES = [
    _example("Where is my order ORD-12345?", {"intent": "order_status", "order_id": "ORD-12345"}, 1),
    _example("I want a refund for my kettle", {"intent": "refund", "order_id": None}, 2),
    _example("hello, thanks a lot", {"intent": "other", "order_id": None}, 3),
]


def test_every_support_answer_follows_the_support_schema():
    schema = support_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for split in SPLITS:
        for example in build_support_split(split):
            jsonschema.validate(json.loads(example.messages[-1]["content"]), schema)
    with pytest.raises(jsonschema.ValidationError):  # and it is not vacuous
        jsonschema.validate({"intent": "refund", "order_id": "ORD-1", "product": None, "urgency": "low",
                             "sentiment": "neutral"}, schema)


def test_constrained_evaluation_scores_answers_the_schema_accepts():
    """A random tiny model rarely writes JSON; with the schema enforced every answer is valid JSON that
    the schema accepts, and evaluate_constrained scores exactly those answers."""
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=4)
    output = OutputFormat.json_schema(SCHEMA, "triage")
    conversations = [list(e.messages[:-1]) for e in EXAMPLES]
    references = [e.messages[-1]["content"] for e in EXAMPLES]
    answers = generate(model, tokenizer, conversations, max_new_tokens=60, output=output)
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)
    free = generate(model, tokenizer, conversations, max_new_tokens=60)
    assert score_answers(free, references)["json_valid"] < 1.0  # enforcing the schema changed the answers
    scores = evaluate_constrained(model, tokenizer, EXAMPLES, output, max_new_tokens=60)
    expected = score_answers(answers, references)
    assert scores["json_valid"] == 1.0 and scores["schema"] == "triage"
    assert {k: scores[k] for k in expected} == expected


def test_the_enforced_scores_get_their_own_column():
    side = {"n": 3, "field_accuracy": 0.5, "exact_match": 0.0, "json_valid": 0.5,
            "per_field": {"intent": 0.5}}
    enforced = {"n": 3, "field_accuracy": 0.75, "exact_match": 0.25, "json_valid": 1.0,
                "per_field": {"intent": 0.875}}
    result = {"n": 3, "base": side, "tuned": side, "tuned_constrained": enforced}
    console = Console(record=True, width=150)
    console.print(render_comparison(result))
    text = console.export_text()
    assert "tuned, schema enforced" in text and "0.875" in text and "1.000" in text
    lines = comparison_lines(result)
    assert "| metric | base | tuned | Δ | tuned, schema enforced |" in lines
    assert "| intent | 0.500 | 0.500 | 0.875 |" in lines


# --- the command line ----------------------------------------------------------------------------------
@pytest.fixture
def tiny_run(tmp_path):
    """A saved tiny chat model, a LoRA adapter for it, held-out examples and the schema as files."""
    save_tiny_run(tmp_path)
    lines = [json.dumps({"messages": e.messages}) + "\n" for e in EXAMPLES]
    (tmp_path / "test.jsonl").write_text("".join(lines))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA, indent=2))
    return tmp_path


def test_cli_generate_with_a_json_schema(tiny_run):
    model = ["--model", str(tiny_run / "model"), "--dtype", "float32", "--max-new-tokens", "60"]
    result = CliRunner().invoke(app, ["generate", "Where is my order ORD-12345?", *model,
                                      "--json-schema", str(tiny_run / "schema.json")])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_a_bad_schema_file_is_refused_before_the_model_loads(tiny_run):
    bad = tiny_run / "bad.json"
    bad.write_text('{"type": "object",\n "properties": {,}}')
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(tiny_run / "nowhere"),
                                      "--json-schema", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}, line 2, column 17: not JSON" in " ".join(result.output.split())
    with pytest.raises(StructuredOutputError, match="cannot read the JSON Schema file"):
        read_json_schema(tiny_run / "missing.json")


def test_cli_eval_constrained(tiny_run):
    args = ["eval", str(tiny_run / "run"), "--model", str(tiny_run / "model"), "--data",
            str(tiny_run / "test.jsonl"), "--no-retention", "--dtype", "float32", "--max-new-tokens", "60"]
    unknown = CliRunner().invoke(app, [*args, "--constrained"])
    assert unknown.exit_code == 2
    assert "knows the JSON Schema of the built-in support task only" in " ".join(unknown.output.split())
    schema = ["--json-schema", str(tiny_run / "schema.json")]
    result = CliRunner().invoke(app, [*args, *schema], terminal_width=160)
    assert result.exit_code == 0, result.output
    written = json.loads((tiny_run / "run" / "eval.json").read_text())
    assert written["tuned_constrained"]["json_valid"] == 1.0 and written["tuned_constrained"]["n"] == 3
    assert "schema enforced" in result.output
    assert "tuned, schema enforced" in (tiny_run / "run" / "report.md").read_text()


@pytest.mark.slow
def test_the_default_model_answers_support_tickets_in_the_schema():
    """The real default model (SmolLM2) on support tickets, with the task's schema enforced: every
    answer is one the schema accepts."""
    import torch

    from tailor.models import load_model

    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    examples = build_support_split("test", 4)
    conversations = [list(e.messages[:-1]) for e in examples]
    answers = generate(model, tokenizer, conversations, max_new_tokens=64,
                       output=OutputFormat.json_schema(support_schema()))
    for answer in answers:
        jsonschema.validate(json.loads(answer), support_schema())
