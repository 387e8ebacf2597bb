"""tailor.eval: structured scores, batched greedy generation, validation loss, base vs tuned, retention."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPUS, chat_tokenizer, save_tiny_run, tiny_chat_llama
from rich.console import Console
from transformers import LlamaForCausalLM

from tailor.data import Example
from tailor.eval import (
    RETENTION_ITEMS,
    compare_base_and_tuned,
    evaluate_model,
    generate,
    parse_json_object,
    render_comparison,
    render_retention,
    retention_check,
    score_answers,
    score_structured,
    write_eval_json,
)
from tailor.eval.retention import KINDS


def always_says(model: LlamaForCausalLM, token_id: int) -> LlamaForCausalLM:
    """Give the model a head whose greedy choice is always `token_id` (zero weights, one-hot bias)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 1.0
    model.lm_head = head
    return model


def support_example(message: str, answer: dict, i: int) -> Example:
    return Example(
        messages=[{"role": "system", "content": "Triage as JSON."}, {"role": "user", "content": message},
                  {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))}],
        text=None, source=f"test.jsonl:{i}",
    )


EXAMPLES = [
    support_example("Where is my order ORD-12345?", {"intent": "order_status", "order_id": "ORD-12345"}, 1),
    support_example("I want a refund for my kettle", {"intent": "refund", "order_id": None}, 2),
    support_example("hello, thanks a lot", {"intent": "other", "order_id": None}, 3),
]


# ----- parse_json_object / score_structured ------------------------------------------------------------


def test_parse_json_object_takes_the_first_object_in_prose_or_fences():
    assert parse_json_object('Sure! ```json\n{"a": 1, "b": {"c": [1, 2]}}\n``` done {"a": 2}') == {
        "a": 1, "b": {"c": [1, 2]}}
    assert parse_json_object('{not json} then {"a": null}') == {"a": None}
    assert parse_json_object("[1, 2] no object") is None
    assert parse_json_object('{"a": 1') is None  # cut off mid-object
    assert parse_json_object("") is None


def test_score_structured_counts_validity_exact_match_and_fields():
    references = [
        '{"intent":"refund","order_id":"ORD-1","urgency":"high"}',
        '{"intent":"cancel_order","order_id":null,"urgency":"low"}',
        '{"intent":"return","order_id":"ORD-3","urgency":"medium"}',
        '{"intent":"billing_issue","order_id":"ORD-4","urgency":"low"}',
    ]
    predictions = [
        'Here you go: {"intent": "refund", "order_id": "ORD-1", "urgency": "high"}',  # all right
        '{"intent":"cancel_order","urgency":"low","note":"extra"}',  # order_id missing, extra key
        '{"intent":"Return","order_id":"ORD-3","urgency":"medium"',  # not valid JSON (cut off)
        '{"intent":"billing_issue","order_id":"ORD-9","urgency":"low"}',  # wrong order id
    ]
    scores = score_structured(predictions, references)
    assert scores["n"] == 4
    assert scores["json_valid"] == pytest.approx(3 / 4)
    assert scores["exact_match"] == pytest.approx(1 / 4)
    # right fields: 3 + 2 (missing order_id) + 0 (invalid) + 2 (wrong order_id) out of 12
    assert scores["field_accuracy"] == pytest.approx(7 / 12)
    assert scores["per_field"] == pytest.approx({"intent": 3 / 4, "order_id": 1 / 4, "urgency": 3 / 4})


def test_score_structured_compares_values_exactly_as_json():
    references = ['{"n":12,"flag":true,"name":"Kettle"}']
    scores = score_structured(['{"n":"12","flag":1,"name":"kettle"}'], references)
    assert scores["json_valid"] == 1.0 and scores["field_accuracy"] == 0.0 and scores["exact_match"] == 0.0
    assert score_structured(['{"name":"Kettle","flag":true,"n":12}'], references)["exact_match"] == 1.0


def test_score_structured_refuses_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_structured(["{}", "{}"], ['{"a":1}'])
    with pytest.raises(ValueError, match="not JSON objects"):
        score_structured(["{}"], ["refund"])


# ----- generate ---------------------------------------------------------------------------------------


def test_generate_stops_after_max_new_tokens():
    tokenizer = chat_tokenizer()
    model = always_says(tiny_chat_llama(len(tokenizer)), tokenizer.convert_tokens_to_ids("!"))
    answers = generate(model, tokenizer, [[{"role": "user", "content": "hello"}]] * 2, max_new_tokens=5)
    assert answers == ["!!!!!", "!!!!!"]


def test_generate_stops_at_im_end_even_when_eos_differs():
    tokenizer = chat_tokenizer(eos="<|endoftext|>", im_end_special=False)
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["<|im_end|>"])) == "<|im_end|>"  # kept as text
    model = always_says(tiny_chat_llama(len(tokenizer)), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    answers = generate(model, tokenizer, [[{"role": "user", "content": "hello"}]], max_new_tokens=5)
    assert answers == [""]


def test_generate_batched_with_left_padding_matches_one_by_one():
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=3)
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Triage as JSON."}, {"role": "user", "content": CORPUS[0]}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    batched = generate(model, tokenizer, conversations, max_new_tokens=12, batch_size=3)
    single = [generate(model, tokenizer, [c], max_new_tokens=12, batch_size=1)[0] for c in conversations]
    assert all(isinstance(a, str) for a in batched)
    assert batched == single
    assert len(set(batched)) > 1  # the prompts matter: not one constant string


def test_generate_restores_training_mode():
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer)).train()
    generate(model, tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=2)
    assert model.training


# ----- evaluate_model / compare_base_and_tuned -----------------------------------------------------------


def test_evaluate_model_reports_metrics_and_matches_hf_loss():
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=1)
    result = evaluate_model(model, tokenizer, EXAMPLES, max_new_tokens=8, batch_size=2)
    for key in ("n", "field_accuracy", "exact_match", "json_valid", "per_field", "val_loss", "perplexity",
                "samples"):
        assert key in result, key
    assert result["n"] == 3 and len(result["samples"]) == 3
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))

    # Reference: transformers' own loss (mean CE over labels != -100) on the same tokens, all in one batch.
    from tailor.data import collate, tokenize_examples

    tokenized, stats = tokenize_examples(EXAMPLES, tokenizer, max_seq_len=1024)
    batch = collate(tokenized, tokenizer.pad_token_id)
    with torch.no_grad():
        hf_loss = model(**batch).loss
    assert result["val_loss"] == pytest.approx(float(hf_loss), rel=1e-4)


def test_compare_base_and_tuned_switches_the_adapter_off_for_base(tmp_path):
    from tailor.lora import LoraConfig, add_lora

    tokenizer = chat_tokenizer()
    plain = tiny_chat_llama(len(tokenizer), seed=2)
    expected_base = evaluate_model(plain, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=4)
    model = add_lora(tiny_chat_llama(len(tokenizer), seed=2),
                     LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    some = RETENTION_ITEMS[::10]  # every kind; the whole set takes a minute with a model that never stops
    result = compare_base_and_tuned(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=4,
                                    retention_items=some)

    assert result["n"] == 3
    assert result["base"]["val_loss"] == pytest.approx(expected_base["val_loss"], rel=1e-5)
    assert result["tuned"]["val_loss"] != pytest.approx(expected_base["val_loss"], rel=1e-3)
    assert [s["base"] for s in result["samples"]] == [s["prediction"] for s in expected_base["samples"]]
    for side in ("base", "tuned"):
        for key in ("field_accuracy", "exact_match", "val_loss"):
            assert isinstance(result[side][key], float), (side, key)
        assert result["retention"][side]["n"] == len(some)
        assert set(result["retention"][side]["per_kind"]) == set(KINDS)
        assert sum(k["n"] for k in result["retention"][side]["per_kind"].values()) == len(some)
        off_task = result["retention"][side]["off_task"]  # the task's answers are JSON objects
        assert off_task["fields"] == ["intent", "order_id"]
        assert result[side]["off_task_rate"] == off_task["rate"] == off_task["count"] / len(some)

    path = write_eval_json(result, tmp_path / "run" / "eval.json")
    assert json.loads(path.read_text())["tuned"]["val_loss"] == result["tuned"]["val_loss"]
    assert not [p for p in path.parent.iterdir() if p.name != "eval.json"]  # no temp file left behind

    console = Console(record=True, width=120)
    console.print(render_comparison(result))
    console.print(render_retention(result))
    text = console.export_text()
    assert "field accuracy" in text and "validation loss" in text and "order_id" in text
    assert "capability retention: base" in text and "off-task" in text


def test_score_answers_falls_back_to_exact_text_match_for_plain_answers():
    scores = score_answers(["Paris", " Rome ", "{}"], ["Paris", "Rome", "Berlin"])
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["field_accuracy"] is None and scores["json_valid"] is None


# ----- retention on the real default model ----------------------------------------------------------------


@pytest.mark.slow
def test_retention_prompts_are_answered_by_the_base_model():
    import torch

    from tailor.models import load_model

    # fp32, the precision every item was kept in (tailor.eval.retention). In bf16 the answers depend on the
    # CPU's bf16 kernels: on an AVX512-BF16 Xeon (2026-12-07) the base misses "What is 7 + 6?" in bf16, so
    # `tailor demo` there reports base 112/113; on the AVX2 machines (fp32) it answers all 113.
    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    result = retention_check(model, tokenizer)
    wrong = [(item["prompt"], item["answer"]) for item in result["items"] if not item["ok"]]
    assert result["n"] == len(RETENTION_ITEMS) >= 100
    assert not wrong
    assert result["accuracy"] == 1.0
    assert {kind: k["accuracy"] for kind, k in result["per_kind"].items()} == dict.fromkeys(KINDS, 1.0)


# ----- command line -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path):
    """A saved tiny chat model, a LoRA adapter for it, and a JSONL file of held-out examples."""
    save_tiny_run(tmp_path)
    with open(tmp_path / "test.jsonl", "w") as handle:
        for example in EXAMPLES:
            handle.write(json.dumps({"messages": example.messages}) + "\n")
    return tmp_path


def test_cli_eval_writes_eval_json(tiny_run):
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, [
        "eval", str(tiny_run / "run"), "--model", str(tiny_run / "model"),
        "--data", str(tiny_run / "test.jsonl"), "--n", "2", "--no-retention", "--dtype", "float32",
        "--max-new-tokens", "4",
    ])
    assert result.exit_code == 0, result.output
    written = json.loads((tiny_run / "run" / "eval.json").read_text())
    assert written["n"] == 2
    for side in ("base", "tuned"):
        assert all(isinstance(written[side][k], float) for k in ("field_accuracy", "exact_match", "val_loss"))
    assert written["base"]["val_loss"] != written["tuned"]["val_loss"]
    assert "validation loss" in result.output
    assert (tiny_run / "run" / "report.md").is_file()  # the run's report picks up eval.json


def test_cli_eval_without_adapter_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "nothing to compare" in result.output


def test_cli_generate_and_chat(tiny_run):
    from typer.testing import CliRunner

    from tailor.cli import app

    model = ["--model", str(tiny_run / "model"), "--dtype", "float32", "--max-new-tokens", "3"]
    adapter = ["--adapter", str(tiny_run / "run" / "adapter")]
    once = CliRunner().invoke(app, ["generate", "hello", *model, *adapter])
    assert once.exit_code == 0, once.output
    assert len(once.stdout.strip().splitlines()) <= 1

    chat = CliRunner().invoke(app, ["chat", *model], input="hello\n/reset\nhello\n/exit\nnot read\n")
    assert chat.exit_code == 0, chat.output
    answers = chat.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # /reset: the same first turn again
