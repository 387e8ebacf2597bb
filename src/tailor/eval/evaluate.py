"""Evaluate a model on held-out examples, and compare the base model with its adapter."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from tailor.data import Example
from tailor.eval.generate import generate
from tailor.eval.retention import RETENTION_ITEMS, RetentionItem, off_task, retention_check
from tailor.eval.structured import parse_json_object, score_structured, task_fields
from tailor.files import atomic_write_json
from tailor.serve.constraints import OutputFormat

N_SAMPLES = 3
# A built-in task's metric (tailor.data.tasks.BuiltinTask.score): (predictions, examples) -> {"score", ...}
TaskScore = Callable[[list[str], list[Example]], dict[str, Any]]


def split_prompt_and_reference(examples: list[Example]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """(conversation without its last assistant message, that message) for each chat example.

    Raises:
        ValueError: an example that is plain text or does not end with an assistant message.
    """
    unusable = [e.source for e in examples if not e.messages or e.messages[-1].get("role") != "assistant"]
    if unusable:
        raise ValueError(
            f"{len(unusable)} example(s) have no final assistant message to compare with (first: "
            f"{unusable[0]}); generation metrics need chat/alpaca/prompt-completion examples, not plain text."
        )
    return [list(e.messages[:-1]) for e in examples], [e.messages[-1]["content"] for e in examples]


def score_answers(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Structured scores when every reference is a JSON object; otherwise exact match of the stripped
    text only (json_valid, field_accuracy and per_field are then None)."""
    if references and all(parse_json_object(r) is not None and r.strip().startswith("{") for r in references):
        return score_structured(predictions, references)
    n = len(references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {"n": n, "json_valid": None, "exact_match": exact / n if n else 0.0, "field_accuracy": None,
            "per_field": None}


def validation_loss(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int = 16,
    max_seq_len: int = 1024,
) -> float | None:
    """Mean cross-entropy per supervised (assistant) token, as the trainer computes it
    (tailor.loss.validation_loss over tailor.data.tokenize_examples), in the model's own dtype."""
    from tailor.data import tokenize_examples
    from tailor.loss import validation_loss as train_validation_loss

    tokenized, _ = tokenize_examples(examples, tokenizer, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return train_validation_loss(model, tokenized, batch_size, pad_id, precision="fp32")


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_seq_len: int = 1024,
) -> dict[str, Any]:
    """Generation metrics and validation loss of `model` on `examples`.

    Returns n, field_accuracy, exact_match, json_valid, per_field (see `score_structured`), val_loss
    (mean CE per answer token), perplexity = exp(val_loss), samples (the first few answers), seconds,
    and predictions (every answer, in example order).
    """
    if not examples:
        raise ValueError("evaluate_model needs at least one example.")
    started = time.perf_counter()
    conversations, references = split_prompt_and_reference(examples)
    predictions = generate(model, tokenizer, conversations, max_new_tokens, batch_size)
    result = score_answers(predictions, references)
    val_loss = validation_loss(model, tokenizer, examples, batch_size=batch_size, max_seq_len=max_seq_len)
    result["val_loss"] = val_loss
    result["perplexity"] = math.exp(val_loss) if val_loss is not None and val_loss < 50 else None
    result["samples"] = [
        {"source": e.source, "prompt": c[-1]["content"] if c else "", "reference": r, "prediction": p}
        for e, c, r, p in list(zip(examples, conversations, references, predictions, strict=True))[:N_SAMPLES]
    ]
    result["predictions"] = predictions
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def evaluate_constrained(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    output: OutputFormat,
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The task scores of `model` when its answers must follow `output` (a JSON Schema, enforced while it
    generates: `tailor eval --constrained`): n, field_accuracy, exact_match, json_valid, per_field (see
    `score_structured`), schema (its name), seconds."""
    started = time.perf_counter()
    conversations, references = split_prompt_and_reference(examples)
    predictions = generate(model, tokenizer, conversations, max_new_tokens, batch_size, output=output)
    result = score_answers(predictions, references)
    result.update(schema=output.name, seconds=round(time.perf_counter() - started, 2))
    return result


def compare_base_and_tuned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_seq_len: int = 1024,
    retention: bool = True,
    base_model: nn.Module | None = None,
    retention_items: tuple[RetentionItem, ...] = RETENTION_ITEMS,
    task_score: TaskScore | None = None,
) -> dict[str, Any]:
    """Evaluate the tuned `model` against its base: `base_model` when given (e.g. beside a fully
    fine-tuned copy), else the same weights with the LoRA adapters switched off
    (`tailor.lora.disable_adapters`). Returns the eval.json structure:
      {"n": N, "base": {...}, "tuned": {...}, "retention": {"base": {...}, "tuned": {...}} | None,
       "samples": [{"source", "prompt", "reference", "base", "tuned"}, ...]}
    `retention_items` are the general prompts asked of both sides (tailor.eval.retention), unless
    `retention` is False. base/tuned hold the `evaluate_model` metrics (without per-example predictions) plus
    retention_accuracy and off_task_rate (the share of general prompts answered in the task's JSON shape,
    `tailor.eval.retention.off_task`; None when the task's answers are not JSON objects), and each side's
    retention holds per_kind and off_task. With `task_score` (a built-in task's metric), base/tuned also
    hold `score` (its primary value, 0..1) and `task_details` (the rest of what it returns).
    """
    from tailor.lora import disable_adapters

    settings = (max_new_tokens, batch_size, max_seq_len, retention_items if retention else (), task_score)
    with disable_adapters(model) if base_model is None else contextlib.nullcontext():
        base = _evaluate_side(model if base_model is None else base_model, tokenizer, examples, *settings)
    tuned = _evaluate_side(model, tokenizer, examples, *settings)
    return _comparison(examples, base, tuned)


def _evaluate_side(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_new_tokens: int,
    batch_size: int, max_seq_len: int, retention_items: tuple[RetentionItem, ...],
    task_score: TaskScore | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    metrics = evaluate_model(model, tokenizer, examples, max_new_tokens, batch_size, max_seq_len)
    if task_score is not None:
        details = dict(task_score(metrics["predictions"], examples))
        metrics["score"] = details.pop("score")
        metrics["task_details"] = details
    kept = (retention_check(model, tokenizer, retention_items, batch_size=batch_size) if retention_items
            else None)
    metrics["retention_accuracy"] = kept["accuracy"] if kept else None
    return metrics, kept


def _comparison(examples: list[Example], base_side: tuple, tuned_side: tuple) -> dict[str, Any]:
    (base, base_retention), (tuned, tuned_retention) = base_side, tuned_side
    conversations, references = split_prompt_and_reference(examples)
    fields = task_fields(references)
    for metrics, kept in (base_side, tuned_side):
        if kept is not None and fields is not None:
            kept["off_task"] = off_task(kept, fields)
        metrics["off_task_rate"] = (kept or {}).get("off_task", {}).get("rate")
    samples = [
        {"source": e.source, "prompt": c[-1]["content"] if c else "", "reference": r, "base": b, "tuned": t}
        for e, c, r, b, t in zip(examples, conversations, references, base["predictions"],
                                 tuned["predictions"], strict=True)
    ][:N_SAMPLES]
    for side in (base, tuned):
        del side["predictions"], side["samples"]
    has_retention = base_retention is not None and tuned_retention is not None
    return {
        "n": len(examples),
        "base": base,
        "tuned": tuned,
        "retention": {"base": base_retention, "tuned": tuned_retention} if has_retention else None,
        "samples": samples,
    }


def write_eval_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write `result` as indented JSON, atomically (tailor.files.atomic_write_json)."""
    return atomic_write_json(path, result)
