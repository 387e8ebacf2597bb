"""`tailor eval RUN --safety`: the safety probes (tailor.eval.safety) of a run, base against tuned, into
eval.json's "safety" entry (what else eval.json holds is kept) and the run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor.eval.safety import SAFETY_BATCH_SIZE, default_voice_rules, evaluate_safety, load_probes
from tailor.eval.safety_checks import VoiceRules

__all__ = ["run_safety", "safety_run"]


def run_safety(method, deliverable: Path, base_name: str, run: Path | None, probes: str | Path | None,
               dtype: str, device: str | None, batch_size: int, builtin: bool,
               voice_rules: VoiceRules | None) -> dict[str, Any]:
    """Load the base and the run's deliverable (as `tailor eval` does), answer the probes with both."""
    from tailor.models import parse_dtype

    chosen, sources, skipped = load_probes(run, probes, builtin)  # a bad probe file fails before the load
    base, tokenizer = method.load_base(base_name, parse_dtype(dtype), device)
    tuned = method.attach(base, deliverable)
    base.eval()
    tuned.eval()
    result = evaluate_safety(tuned, tokenizer, chosen, None if tuned is base else base,
                             voice_rules or default_voice_rules(), batch_size, skipped)
    return {"sources": sources, **result}


def safety_run(run_dir: str | Path | None = None, *, model: str | None = None,
               adapter: str | Path | None = None, probes: str | Path | None = None,
               out: str | Path | None = None, dtype: str = "auto", batch_size: int = SAFETY_BATCH_SIZE,
               builtin: bool = True, voice_rules: VoiceRules | None = None) -> dict[str, Any]:
    """The safety probes of `run_dir` (or `adapter` on `model`): the built-in set (unless `builtin` is
    False), the run's canary probes and `probes` (a file). Writes eval.json's "safety" (`out`, default
    run_dir/eval.json) and, for a run, refreshes report.md. Returns the safety entry plus eval_json."""
    from tailor.eval.run import _what_to_compare
    from tailor.files import atomic_write_json, check_output_path

    run, config, method, deliverable, base_name = _what_to_compare(run_dir, model, adapter)
    target = check_output_path(Path(out) if out else (run / "eval.json" if run else Path("eval.json")))
    safety = run_safety(method, deliverable, base_name, run, probes, dtype, config.get("device"), batch_size,
                        builtin, voice_rules)
    current = _read_eval_json(target)
    current.setdefault("model", base_name)
    current.setdefault("adapter", str(deliverable))
    current["safety"] = safety
    atomic_write_json(target, current)
    if run is not None and target.resolve() == (run / "eval.json").resolve():
        from tailor.report import write_report

        write_report(run)
    return {**safety, "eval_json": str(target)}


def _read_eval_json(path: Path) -> dict[str, Any]:
    try:
        current = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        current = {}
    return current if isinstance(current, dict) else {}
