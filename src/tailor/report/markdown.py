"""report.md for a run directory: what was trained, on what, how fast, and how much better it got.

Reads what the run wrote (config.yaml, summary.json, metrics.jsonl, and eval.json when an evaluation
ran) so the report can be regenerated at any time with `write_report(run_dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tailor.files import atomic_write_text
from tailor.names import RUN_CONFIG_NAME

CONFIG_KEYS = ("method", "model", "data", "val_data", "max_seq_len", "rank", "lora_alpha", "lora_dropout",
               "target_modules", "use_rslora", "use_dora", "init_lora_weights", "max_steps", "epochs",
               "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "warmup_ratio", "weight_decay",
               "max_grad_norm", "optimizer", "loraplus_lr_ratio", "precision",
               "gradient_checkpointing", "seed")
METRIC_ROWS = (("field_accuracy", "Per-field accuracy"), ("exact_match", "Exact match"),
               ("json_valid", "Valid JSON"), ("val_loss", "Validation loss"), ("perplexity", "Perplexity"))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def comparison_lines(evaluation: dict[str, Any]) -> list[str]:
    """Base vs tuned table (and per-field accuracies) from an eval.json dict; a last column for the tuned
    model with the task's schema enforced when eval.json has it (`tailor eval --constrained`)."""
    base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
    enforced = evaluation.get("tuned_constrained")
    extra = ["tuned, schema enforced"] if enforced is not None else []
    rows = []
    metric = (evaluation.get("task") or {}).get("metric", "the task's metric")
    score = [] if metric in dict(METRIC_ROWS) else [("score", f"Task score ({metric})")]  # support's is a row
    for key, label in (*score, *METRIC_ROWS):
        if key not in base and key not in tuned:
            continue
        b, t = base.get(key), tuned.get(key)
        delta = f"{t - b:+.3f}" if isinstance(b, (int, float)) and isinstance(t, (int, float)) else "–"
        rows.append([label, _fmt(b), _fmt(t), delta, *([_fmt(enforced.get(key))] if extra else [])])
    n = tuned.get("n", base.get("n"))
    lines = [f"Held-out examples: {n}", "", *_table(["metric", "base", "tuned", "Δ", *extra], rows)]
    per_base, per_tuned = base.get("per_field") or {}, tuned.get("per_field") or {}
    per_enforced = (enforced or {}).get("per_field") or {}
    if per_base or per_tuned:
        fields = list(dict.fromkeys([*per_tuned, *per_base]))
        lines += ["", *_table(["field", "base", "tuned", *extra],
                              [[f, _fmt(per_base.get(f)), _fmt(per_tuned.get(f)),
                                *([_fmt(per_enforced.get(f))] if extra else [])] for f in fields])]
    return lines


def harness_lines(harness: dict[str, Any]) -> list[str]:
    """Base vs tuned scores of lm-evaluation-harness tasks (eval.json's "harness", `tailor eval --harness`);
    standard errors beside the scores."""
    base, tuned = harness.get("base") or {}, harness.get("tuned") or {}
    rows = []
    for task in dict.fromkeys([*base, *tuned]):
        b, t = base.get(task) or {}, tuned.get(task) or {}
        for metric in dict.fromkeys([*b, *t]):
            if metric == "higher_is_better" or "_stderr" in metric:
                continue
            cells = []
            for side in (b, t):
                error = side.get(f"{metric}_stderr")
                spread = f" ± {_fmt(error)}" if isinstance(error, float) else ""
                cells.append(_fmt(side.get(metric)) + spread)
            delta = (f"{t[metric] - b[metric]:+.3f}" if isinstance(b.get(metric), (int, float))
                     and isinstance(t.get(metric), (int, float)) else "–")
            rows.append([task, metric, *cells, delta])
    limit = f" (first {harness['limit']} examples per task)" if harness.get("limit") else ""
    return [f"Scored by lm-eval's local-completions against `tailor serve`{limit}:", "",
            *_table(["task", "metric", "base", "tuned", "Δ"], rows)]


def conversion_lines(adapter_dir: Path) -> list[str]:
    """What the save of a PiSSA/OLoRA adapter converted (its tailor_metadata.json `conversion`), or []."""
    metadata = _read_json(adapter_dir / "tailor_metadata.json")
    conversion = (metadata or {}).get("conversion") if isinstance(metadata, dict) else None
    if not conversion:
        return []
    (r, saved_r), (alpha, saved_alpha) = conversion["r"], conversion["lora_alpha"]
    return ["## Saved for the original base", "",
            f"`init_lora_weights: {conversion['init_lora_weights']}` trained the adapter on a residual base "
            "(the top-r part of each adapted weight moved into B A). The adapter in "
            f"`{adapter_dir.name}/` is converted to an ordinary LoRA on the original base, as PEFT's "
            "`path_initial_model_for_weight_conversion` does: rank "
            f"{r} -> {saved_r}, lora_alpha {_fmt(alpha)} -> {_fmt(saved_alpha)} (the same scaling), "
            "A' = [A ; A0], B' = [B | -B0], so B'A' = BA - B0A0. It loads, serves and merges on the "
            "original base model like any LoRA adapter.", ""]


def render_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    config_path = run_dir / RUN_CONFIG_NAME
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    summary = _read_json(run_dir / "summary.json") or {}
    evaluation = _read_json(run_dir / "eval.json")
    name = config.get("name") or run_dir.name
    out = [f"# tailor run: {name}", ""]
    canaries = summary.get("canaries")
    if canaries:  # loud, first: such an adapter must not be shipped by mistake
        out += [f"> **Warning: {canaries['n']} canaries planted.** This run was {canaries['note']} "
                f"(the secrets: `{canaries['file']}`; `tailor eval --safety` measures their leakage).", ""]

    settings = [[k, f"`{_fmt(config.get(k))}`"] for k in CONFIG_KEYS if k in config]
    precision = summary.get("precision")
    if precision:  # what ran, and why (precision auto resolves by the device: tailor.hardware)
        settings = [[k, f"`{precision['resolved']}` ({precision['reason']})" if k == "precision" else v]
                    for k, v in settings]
    replay = summary.get("replay")
    if config.get("replay_ratio") and replay:
        settings += [["replay_ratio", f"`{_fmt(config['replay_ratio'])}`"],
                     ["replay_loss", f"`{config.get('replay_loss', 'ce')}`"],
                     ["replay_prompts", f"`{config.get('replay_prompts') or 'built-in'}`: "
                                        f"{replay['kept']} of {replay['prompts']} answers kept"]]
    out += ["## Setup", "", *_table(["setting", "value"], settings), ""]

    data = summary.get("data") or {}
    if data:
        rows = []
        for split in ("train", "validation"):
            s = data.get(split)
            if s:
                rows.append([split, *(_fmt(s.get(k)) for k in ("n_in", "n_kept", "n_truncated", "n_dropped",
                                                               "n_tokens", "n_supervised_tokens"))])
        out += ["## Data", "", *_table(["split", "examples", "kept", "truncated", "dropped", "tokens",
                                        "tokens with loss"], rows), ""]

    if summary:
        trainable, total = summary.get("trainable_params"), summary.get("total_params")
        share = f" ({100 * trainable / total:.2f}% of {total:,})" if trainable and total else ""
        speed = _fmt(summary.get("tokens_per_s"), 0)
        seen = f"{_fmt(summary.get('tokens'))} ({_fmt(summary.get('supervised_tokens'))} with loss)"
        best = f"{_fmt(summary.get('best_val_loss'), 4)} (step {_fmt(summary.get('best_step'))})"
        rows = [
            ["Steps", _fmt(summary.get("steps"))],
            ["Training time", f"{_fmt(summary.get('train_seconds'), 1)} s"],
            ["Throughput", f"{speed} tokens/s (real tokens, padding excluded)"],
            ["Tokens seen", seen],
            ["Final training loss", _fmt(summary.get("final_train_loss"), 4)],
            ["Final validation loss", _fmt(summary.get("final_val_loss"), 4)],
            ["Best validation loss", best],
            ["Weights delivered", f"{summary.get('weights_dir')}/ ({summary.get('final_weights')} step)"],
            ["Trainable parameters", f"{_fmt(trainable)}{share}"],
            ["Size on disk", human_bytes(summary.get("weights_bytes"))],
            ["Peak memory (RSS)", f"{_fmt(summary.get('peak_rss_mib'), 0)} MiB"],
            ["Device", f"{summary.get('device')} ({summary.get('num_threads')} threads)"],
        ]
        if summary.get("cuda_max_allocated_mib") is not None:
            rows.append(["Peak CUDA memory", f"{_fmt(summary['cuda_max_allocated_mib'], 0)} MiB"])
        planned = summary.get("planned_peak_gib")
        if planned is not None:
            measured = summary.get("peak_cuda_gib") or summary.get("peak_rss_gib")
            kind = "peak CUDA allocation" if summary.get("peak_cuda_gib") else "peak RSS"
            error = f" ({100 * (measured - planned) / planned:+.0f}%)" if measured else ""
            rows.append(["Planned peak (`tailor plan`)",
                         f"{planned:.2f} GiB; measured {_fmt(measured, 2)} GiB {kind}{error}"])
        if summary.get("resumed_from"):
            rows.append(["Resumed from", f"`{summary['resumed_from']}`"])
        out += ["## Training", "", *_table(["", ""], rows), ""]
        if (run_dir / "loss.png").exists():
            out += ["![loss curve](loss.png)", ""]
        out += conversion_lines(run_dir / str(summary.get("weights_dir", "adapter")))

    if evaluation:
        if evaluation.get("base") or evaluation.get("tuned"):  # an eval.json may hold the harness only
            out += ["## Base vs tuned", "", *comparison_lines(evaluation), ""]
        if evaluation.get("harness"):
            out += ["## lm-evaluation-harness", "", *harness_lines(evaluation["harness"]), ""]
        if evaluation.get("safety"):
            from tailor.report.safety import safety_lines

            out += ["## Safety", "", *safety_lines(evaluation["safety"]), ""]
        retention = evaluation.get("retention")
        if retention:
            sides = [(who, r) for who, r in retention.items() if isinstance(r, dict)]
            kinds = list(dict.fromkeys(kind for _, r in sides for kind in r.get("per_kind") or {}))
            rows = [[who, f"{r.get('correct')}/{r.get('n')}", _fmt(r.get("accuracy")),
                     *(_fmt((r.get("per_kind") or {}).get(kind, {}).get("accuracy")) for kind in kinds),
                     _fmt((r.get("off_task") or {}).get("rate"))]
                    for who, r in sides]
            out += ["## Capability retention", "",
                    "General prompts the base model answers correctly, asked again with the adapter "
                    "(accuracy overall and per kind); off-task: the share answered in the task's format:", "",
                    *_table(["model", "correct", "accuracy", *kinds, "off-task"], rows), ""]
        preferences = evaluation.get("preferences")
        if preferences:
            rows = [[who, _fmt(preferences[who].get("accuracy")), _fmt(preferences[who].get("mean_margin"))]
                    for who in ("base", "tuned")]
            out += ["## Preferences", "",
                    f"Held-out pairs ({preferences.get('n')}, `{preferences.get('data')}`): the share where "
                    "the model scores the preferred answer above the other (summed log-probability):", "",
                    *_table(["model", "preference accuracy", "mean log-prob margin"], rows), ""]
        samples = evaluation.get("samples") or []
        example = evaluation.get("example") or (samples[0] if samples else None)
        if example:
            out += ["## One held-out example", "", "**Input**", "", _quote(example.get("prompt", "")), "",
                    "**Reference**", "", f"```\n{example.get('reference', '')}\n```", "",
                    "**Base model**", "", f"```\n{example.get('base', '')}\n```", "",
                    "**Tuned model**", "", f"```\n{example.get('tuned', '')}\n```", ""]
    files = [RUN_CONFIG_NAME, "metrics.jsonl", "loss.png", "summary.json",
             *(["eval.json"] if evaluation else []), *([canaries["file"]] if canaries else []),
             f"{summary.get('weights_dir', 'adapter')}/", "checkpoints/"]
    out += ["## Files", "", ", ".join(files), ""]
    return "\n".join(out)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in str(text).splitlines()) or ">"


def write_report(run_dir: Path) -> Path:
    """Render report.md into the run directory (atomically) and return its path."""
    return atomic_write_text(Path(run_dir) / "report.md", render_report(run_dir))
