"""`tailor demo`: train a LoRA adapter on the built-in support-ticket dataset, then show base vs tuned.

The recipe is sized for 2 CPU cores with native bf16 (AVX512-BF16: 8 minutes end to end, examples/demo.yaml
is the same recipe as a file; a test keeps the two equal). Where bf16 is not native (AVX2 only), precision
auto runs fp32, whose matmuls reach 4-8x fewer FLOP/s on 2 cores than bf16 on an AVX512-BF16 CPU; the demo
then runs FP32_CPU_RECIPE (steps of 2 examples: on a budget of examples, more, smaller steps learned more
than fewer large ones, measured) and fits its step count to the machine: it times a few real training
steps at start-up and runs as many steps as let the whole demo end within FP32_CPU_BUDGET_S (at most the
recipe's), scoring fewer held-out tickets. It says so when it starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tailor.names import RUN_CONFIG_NAME

DEMO_RECIPE: dict[str, Any] = {
    "name": "demo",
    "method": "lora",
    "data": "builtin:support",
    "replay_ratio": 0.4,  # two examples in five replay the base model's own general answers: keeps them
    "replay_loss": "kl",  # ... by staying near the base's distribution there, not by copying its answers
    "max_seq_len": 256,  # the longest built-in ticket is ~220 tokens
    "rank": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],  # attention only: forgets less
    "max_steps": 250,
    "batch_size": 8,
    "lr": 2.0e-3,
    "warmup_steps": 10,
    "schedule": "cosine",
    "precision": "auto",  # bf16 where native (AVX512-BF16/AMX, CUDA), fp32 otherwise
    "eval_every": 0,
    "eval_batches": 4,
    "save_every": 40,
    "keep_best": False,
    "seed": 0,
}
EVAL_MAX_NEW_TOKENS = 64  # the reference JSON answers are ~40 tokens
EVAL_BATCH_SIZE = 64  # the engine's rows per decode step: 1.7x the tokens/s of 16 on 2 cores in fp32
# Where precision auto runs fp32 on a CPU: the changes to DEMO_RECIPE, and how many held-out tickets to score
FP32_CPU_RECIPE: dict[str, Any] = {"batch_size": 2, "max_steps": 400}
FP32_CPU_EVAL_N = 100
# ... and its time: the whole demo, first run, in at most FP32_CPU_BUDGET_S (steps_within_budget). Measured
# on a 2-core AVX2 machine at 2 threads and at 1 (first runs: 178 and 160; 0.93 and 0.90), what is not
# training costs about FIXED_COST_STEPS of the probe's steps, and a training step (some rows replayed base
# answers, shorter than tickets) MIXED_STEP_RATIO of one.
FP32_CPU_BUDGET_S = 14 * 60
FIXED_COST_STEPS = 170
MIXED_STEP_RATIO = 0.91
MIN_FITTED_STEPS = 100


def _is_previous_demo(path: Path) -> bool:
    """A run directory `tailor demo` wrote (its config.yaml names the demo's run and data): the only kind
    of directory the demo replaces. Any other run, or other files, stay untouched."""
    import yaml

    try:
        config = yaml.safe_load((path / RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and all(config.get(k) == DEMO_RECIPE[k] for k in ("name", "data"))


def demo_recipe(device: str | None = None) -> tuple[dict[str, Any], int | None, str | None]:
    """(the recipe, held-out tickets to score or None for all, why it differs from DEMO_RECIPE or None)
    on `device`: DEMO_RECIPE where its precision resolves to bf16, FP32_CPU_RECIPE's lighter one on a CPU
    where it resolves to fp32."""
    from tailor.hardware import default_device, precision_for, resolve_precision

    device = device or default_device()
    if device.startswith("cuda") or precision_for(DEMO_RECIPE["precision"], device) == "bf16":
        return dict(DEMO_RECIPE), None, None
    why = (f"{resolve_precision(DEMO_RECIPE['precision'], device).reason}; so the lighter recipe: "
           f"steps of {FP32_CPU_RECIPE['batch_size']} examples, as many as fit in {FP32_CPU_BUDGET_S / 60:g} "
           f"minutes (at most {FP32_CPU_RECIPE['max_steps']}), "
           f"{FP32_CPU_EVAL_N} held-out tickets")
    return {**DEMO_RECIPE, **FP32_CPU_RECIPE}, FP32_CPU_EVAL_N, why


def seconds_per_step(config: Any, steps: int = 3) -> float:
    """Seconds one optimizer step of `config` takes on this machine: the median of `steps` real steps of
    the training loop (after one warm-up step) on the task's first examples, with the model and adapter
    as training makes them and no replay (a replayed row is shorter: the estimate errs long). Nothing is
    written outside a throwaway directory."""
    import statistics
    import tempfile

    from tailor.hardware import resolve_base_dtype, resolve_precision
    from tailor.methods import get_method
    from tailor.train.hooks import Hook
    from tailor.train.loop import fit
    from tailor.train.run import load_data, prepare_data, use_threads

    precision = resolve_precision(config.precision, config.device).resolved
    method = get_method(config.method)
    base_dtype = resolve_base_dtype(config.base_dtype, precision, method.float_base).resolved
    config = config.replace(precision=precision, base_dtype=base_dtype, max_steps=steps + 1, replay_ratio=0.0,
                            eval_every=0, save_every=0, resume=False, warmup_steps=0)
    use_threads(config)  # timed at the thread count training will use
    # the base stored as training stores it (tailor.train.run)
    dtype, stored = method.train_dtype(precision, base_dtype), method.stored_dtype(precision, base_dtype)
    model, tokenizer = method.load_base(config.model, dtype, config.device, stored=stored)
    train_examples, _ = load_data(config)
    train_set, _, _ = prepare_data(config, tokenizer, (train_examples[: config.batch_size * (steps + 1)], []))
    model = method.prepare(model, config)
    seconds: list[float] = []

    class StepTimes(Hook):
        def on_step(self, run: Any, record: Any) -> None:
            seconds.append(record.seconds)

    with tempfile.TemporaryDirectory() as scratch:
        fit(model, train_set, [], config, Path(scratch), tokenizer.pad_token_id, lambda *_: None,
            hooks=[StepTimes()])
    return statistics.median(seconds[1:])


def steps_within_budget(step_seconds: float, max_steps: int, budget_s: float = FP32_CPU_BUDGET_S) -> int:
    """How many training steps of `step_seconds` (seconds_per_step's measure) let the whole demo end within
    `budget_s`: what is not training (model conversion, replay answers, evaluation) costs about
    FIXED_COST_STEPS steps, and a training step with replayed rows MIXED_STEP_RATIO of a measured one.
    At most max_steps, at least MIN_FITTED_STEPS (below that the adapter learns too little to show)."""
    fitted = int((budget_s / step_seconds - FIXED_COST_STEPS) / MIXED_STEP_RATIO)
    return max(MIN_FITTED_STEPS, min(max_steps, fitted))


def run_demo(out: str | Path = "runs/demo", max_steps: int | None = None, eval_n: int | None = None,
             batch_size: int = EVAL_BATCH_SIZE) -> dict[str, Any]:
    """Train with DEMO_RECIPE into `out`, evaluate base vs tuned on the held-out test split and the safety
    probes, print the comparison and one example, write eval.json and report.md. Returns the eval.json
    dict."""
    from rich.console import Console

    from tailor.config import load_config
    from tailor.files import check_output_path
    from tailor.train.run import train

    console = Console()
    out = Path(out)
    recipe, machine_eval_n, lighter = demo_recipe()
    eval_n = eval_n or machine_eval_n
    recipe.update(out=str(out), max_steps=max_steps or recipe["max_steps"])
    config = load_config(**recipe)
    check_output_path(out, directory=True)  # a file there (or as a parent) is refused, and left alone
    if out.is_dir() and any(out.iterdir()):
        if not _is_previous_demo(out):
            raise ValueError(f"{out} is not empty and holds no previous demo run; nothing there is touched. "
                             "Choose another --out (the demo replaces only a run `tailor demo` wrote).")
        shutil.rmtree(out)  # a previous demo: the demo always starts fresh
    if lighter:
        console.print(f"[bold]no native bf16 here[/]: {lighter}")
        if not max_steps:  # fit the steps to this machine's measured speed
            step_seconds = seconds_per_step(config)
            fitted = steps_within_budget(step_seconds, config.max_steps)
            console.print(f"measured {step_seconds:.2f} s per step of {config.batch_size} tickets: "
                          f"{fitted} steps (at most {config.max_steps}) fit the demo in "
                          f"{FP32_CPU_BUDGET_S / 60:.0f} minutes here")
            config = config.replace(max_steps=fitted)
    replay = f", {config.replay_ratio:.0%} replayed base answers" if config.replay_ratio else ""
    console.print(f"[bold]tailor demo[/]: LoRA r={config.rank} on {config.data}{replay}, {config.max_steps} "
                  f"steps of {config.batch_size} examples -> {out}")
    run_dir = train(config)

    from tailor.eval import evaluate_run, print_evaluation
    from tailor.serve.constraints import INSTALL_HINT, structured_output_available

    console.print("[bold]evaluating[/] base vs tuned on the held-out test split ...")
    constrained = structured_output_available()  # the tuned model again, the task's JSON Schema enforced
    if not constrained:
        console.print(f"(no schema-enforced column: {INSTALL_HINT})", highlight=False, markup=False)
    # the safety probes too (docs/safety.md): what the adaptation changed beyond the task; not on the
    # lighter fp32 recipe, whose time budget was measured without them (they cost minutes there)
    safety = not lighter
    result = evaluate_run(run_dir, data="builtin:support:test", n=eval_n, batch_size=batch_size,
                          max_new_tokens=EVAL_MAX_NEW_TOKENS, constrained=constrained, safety=safety)
    print_evaluation(result, console, title=f"base vs tuned on {result['n']} held-out tickets")
    if not safety:
        console.print(f"(the fp32 demo's time budget leaves out the safety probes: tailor eval {run_dir} "
                      "--safety)", highlight=False, markup=False)
    console.print(f"\nrun directory: {run_dir} (report.md, eval.json, adapter/)")
    return result
