"""One method of a comparison, in its own process: train it (unless it is a prompting baseline), then
evaluate it on the held-out split and the retention prompts; writes result.json in its folder.

Run by tailor.compare.runner as `python -m tailor.compare.worker JOB.json`; a separate process so that
each method's peak memory is its own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

RESULT_NAME = "result.json"


def training_fields(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A comparison row's training columns from a run's summary.json (what `tailor train` wrote)."""
    peak = summary.get("peak_rss_mib")
    return {"train_seconds": summary.get("train_seconds"), "tokens_per_s": summary.get("tokens_per_s"),
            "trainable_params": summary.get("trainable_params"),
            "artifact_bytes": summary.get("weights_bytes"),
            "peak_rss_bytes": int(peak * 2**20) if peak is not None else None,
            "frozen_weight_bytes": summary.get("frozen_weight_bytes"), "run_dir": str(run_dir),
            "tokens": summary.get("tokens"), "final_val_loss": summary.get("final_val_loss")}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tailor.config import load_config
    from tailor.data import load_examples
    from tailor.data.sources import load_sources
    from tailor.eval import evaluate_model, retention_check, split_prompt_and_reference
    from tailor.eval.prompting import pick_shots, with_shots
    from tailor.eval.retention import off_task
    from tailor.eval.structured import task_fields
    from tailor.methods import get_method
    from tailor.models import load_model, parse_dtype
    from tailor.train import train
    from tailor.train.run import peak_memory

    entry, out = job["entry"], Path(job["out"])
    config = load_config(**{**job["config"], **entry["overrides"], "out": str(out / "run")})
    result: dict[str, Any] = {"method": entry["label"], "training_method": entry["method"],
                              "train_seconds": 0.0, "tokens_per_s": None, "trainable_params": 0,
                              "artifact_bytes": 0, "run_dir": None}
    evaluate = job.get("evaluate", True)
    examples = load_examples(job["eval_data"])[: job.get("eval_n") or None] if evaluate else []
    if entry["method"] is not None:
        run_dir = train(config)
        result.update(training_fields(json.loads((run_dir / "summary.json").read_text()), run_dir))
        if not evaluate:  # a sweep ranks by validation loss only
            return result
        method = get_method(entry["method"])
        base, tokenizer = method.load_base(config.model, parse_dtype("auto"), config.device)
        model = method.attach(base, method.deliverable_dir(run_dir))
    else:
        model, tokenizer = load_model(config.model, dtype=parse_dtype("auto"), device=config.device)
        result.update(frozen_weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
        if entry["shots"]:
            pool = load_sources(config.data, None, 0.0, config.format, config.columns, config.seed)[0]
            shots = pick_shots(pool, entry["shots"], config.seed)
            examples = with_shots(examples, shots)
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate_model(model, tokenizer, examples, max_new_tokens=job.get("max_new_tokens", 64),
                                 batch_size=job.get("batch_size", 16),
                                 max_seq_len=max(config.max_seq_len, 2048))
        kept = retention_check(model, tokenizer, batch_size=job.get("batch_size", 16))
    for key in ("n", "field_accuracy", "exact_match", "json_valid", "val_loss", "per_field"):
        result[key] = metrics.get(key)
    result["score"] = task_score(job["eval_data"], metrics["predictions"], examples)
    fields = task_fields(split_prompt_and_reference(examples)[1]) if examples else None
    result.update(retention=kept["accuracy"], eval_seconds=round(time.perf_counter() - started, 1),
                  off_task=off_task(kept, fields)["rate"] if fields else None, samples=metrics["samples"][:2])
    if job.get("safety"):  # `tailor compare --safety`: the probes' pass rates of this method's model
        from tailor.eval.safety import default_voice_rules, load_probes, model_safety

        probes = load_probes(config.run_dir() if entry["method"] is not None else None)[0]
        result["safety"] = model_safety(model, tokenizer, probes, default_voice_rules(),
                                        job.get("batch_size", 16))
    if entry["method"] is None:
        result["peak_rss_bytes"] = int(peak_memory()["peak_rss_mib"] * 2**20)
    return result


def task_score(eval_data: str, predictions: list[str], examples: list) -> float | None:
    """The built-in task's metric (tailor.data.tasks) when the held-out data is a built-in task's, else
    None."""
    from tailor.data.tasks import task_of_spec

    task = task_of_spec(eval_data)
    return task.score(predictions, examples)["score"] if task is not None and examples else None


def main(argv: list[str]) -> int:
    from tailor.files import atomic_write_json

    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    result = run_job(job)
    atomic_write_json(Path(job["out"]) / RESULT_NAME, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
