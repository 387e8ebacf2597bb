"""`tailor demo`: train a LoRA adapter on the built-in support-ticket dataset, then show base vs tuned.

The recipe is sized to train in at most 10 minutes on 2 CPU cores (examples/demo.yaml is the same recipe
as a file; a test keeps the two equal).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

DEMO_RECIPE: dict[str, Any] = {
    "name": "demo",
    "method": "lora",
    "data": "builtin:support",
    "max_seq_len": 256,  # the longest built-in ticket is ~220 tokens
    "rank": 16,
    "lora_alpha": 32,
    "target_modules": "all-linear",
    "max_steps": 150,
    "batch_size": 8,
    "lr": 1.0e-3,
    "warmup_steps": 10,
    "schedule": "cosine",
    "precision": "bf16",
    "eval_every": 0,
    "eval_batches": 4,
    "save_every": 40,
    "keep_best": False,
    "seed": 0,
}
EVAL_MAX_NEW_TOKENS = 64  # the reference JSON answers are ~40 tokens


def _looks_like_run(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / "metrics.jsonl").exists()


def run_demo(out: str | Path = "runs/demo", max_steps: int | None = None, eval_n: int | None = None,
             batch_size: int = 16) -> dict[str, Any]:
    """Train with DEMO_RECIPE into `out`, evaluate base vs tuned on the held-out test split, print the
    comparison and one example, write eval.json and report.md. Returns the eval.json dict."""
    from rich.console import Console

    from tailor.config import load_config
    from tailor.train.run import train

    console = Console()
    out = Path(out)
    recipe = {**DEMO_RECIPE, "out": str(out), "max_steps": max_steps or DEMO_RECIPE["max_steps"]}
    config = load_config(**recipe)
    if out.exists() and any(out.iterdir()):
        if not _looks_like_run(out):
            raise ValueError(f"{out} exists and is not a tailor run directory; choose another --out")
        shutil.rmtree(out)  # a previous demo: the demo always starts fresh
    console.print(f"[bold]tailor demo[/]: LoRA r={config.rank} on {config.data}, {config.max_steps} steps "
                  f"of {config.batch_size} examples -> {out}")
    run_dir = train(config)

    return evaluate_run(run_dir, eval_n=eval_n, batch_size=batch_size, console=console)


def evaluate_run(run_dir: str | Path, eval_n: int | None = None, batch_size: int = 16,
                 console: Any = None) -> dict[str, Any]:
    """Base vs tuned (the run's adapter) on the built-in held-out test split: eval.json, report.md,
    and the table plus one example printed."""
    import torch
    from rich.console import Console

    from tailor.adapters import load_adapter
    from tailor.config import load_config
    from tailor.data import load_examples
    from tailor.eval import compare_base_and_tuned, render_comparison, write_eval_json
    from tailor.models import load_model
    from tailor.report import write_report

    console = console or Console()
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    console.print("[bold]evaluating[/] base vs tuned on the held-out test split ...")
    # bf16 weights: generation is matmul-bound and bf16 matmuls are several times faster (AMX / GPUs)
    model, tokenizer = load_model(config.model, dtype=torch.bfloat16, device=config.device)
    load_adapter(model, run_dir / "adapter")
    model.eval()
    test = load_examples("builtin:support:test")
    if eval_n:
        test = test[:eval_n]
    with torch.no_grad():
        result = compare_base_and_tuned(model, tokenizer, test, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                        batch_size=batch_size, max_seq_len=config.max_seq_len)
    write_eval_json(result, run_dir / "eval.json")
    write_report(run_dir)

    console.print(render_comparison(result, title=f"base vs tuned on {result['n']} held-out tickets"))
    if result.get("samples"):
        sample = result["samples"][0]
        console.print("\n[bold]customer:[/] " + sample["prompt"], highlight=False)
        console.print("[bold]reference:[/] " + sample["reference"], highlight=False)
        console.print("[bold red]base:[/] " + sample["base"].strip(), highlight=False)
        console.print("[bold green]tuned:[/] " + sample["tuned"].strip(), highlight=False)
    console.print(f"\nrun directory: {run_dir} (report.md, eval.json, adapter/)")
    return result
