"""Evaluation: greedy generation, structured-answer scores, validation loss, base vs tuned, retention."""

from tailor.eval.evaluate import (
    compare_base_and_tuned,
    evaluate_constrained,
    evaluate_model,
    score_answers,
    split_prompt_and_reference,
    validation_loss,
    write_eval_json,
)
from tailor.eval.generate import generate, stop_token_ids
from tailor.eval.render import (
    print_evaluation,
    render_comparison,
    render_harness,
    render_retention,
    render_safety,
)
from tailor.eval.retention import RETENTION_ITEMS, RetentionItem, retention_check
from tailor.eval.run import evaluate_run, harness_run
from tailor.eval.safety import Probe, ProbeError, evaluate_safety, read_probes
from tailor.eval.safety_run import safety_run
from tailor.eval.structured import parse_json_object, score_structured

__all__ = [
    "RETENTION_ITEMS",
    "Probe",
    "ProbeError",
    "RetentionItem",
    "compare_base_and_tuned",
    "evaluate_constrained",
    "evaluate_model",
    "evaluate_run",
    "evaluate_safety",
    "generate",
    "harness_run",
    "parse_json_object",
    "print_evaluation",
    "render_comparison",
    "render_harness",
    "read_probes",
    "render_retention",
    "render_safety",
    "retention_check",
    "safety_run",
    "score_answers",
    "score_structured",
    "split_prompt_and_reference",
    "stop_token_ids",
    "validation_loss",
    "write_eval_json",
]
