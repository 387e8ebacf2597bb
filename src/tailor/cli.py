"""The `tailor` command line. Each command is a thin shell over a function of the package."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import typer
import typer.core

app = typer.Typer(
    name="tailor",
    help="Adapt an open language model to your task on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- train / demo (owner: train) ----------------------------------------------------------------------


def _train_fail(error: Exception, code: int = 2) -> None:
    """Print a clear one-block error (no traceback) and exit. In one of several processes (torchrun) the
    error names the rank and is left for the launcher to report."""
    from rich.console import Console
    from rich.markup import escape

    from tailor.train.distributed import launched_rank, launched_world_size

    message = str(error)
    if launched_world_size() > 1:
        from tailor.train.launch import record_failure

        record_failure(message)
        message = f"rank {launched_rank()}: {message}"
    # escaped: a path such as runs/[exp1] must print as given (and "[/x]" must not raise a MarkupError)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True,
                               soft_wrap=True)
    raise typer.Exit(code)


def _config_flag(name: str, kind: object, doc: str) -> inspect.Parameter:
    """A `--flag` for TrainConfig field `name`, typed from the field and documented by its doc line.
    Every default is None: a flag overrides the YAML only when given."""
    allowed = set(typing.get_args(kind)) - {type(None)} or {kind}
    flag = "--" + name.replace("_", "-")
    if allowed == {bool}:
        option, annotation = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=doc), bool | None
    else:
        scalar = next(iter(allowed)) if len(allowed) == 1 and next(iter(allowed)) in (int, float) else str
        option, annotation = typer.Option(None, flag, help=doc), scalar | None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _with_config_flags(function):
    """Give `function(config, assignments, **fields)` one option per TrainConfig field (tailor.config)."""
    from tailor.config import TrainConfig, field_help

    hints, docs = typing.get_type_hints(TrainConfig), field_help()
    fixed = list(inspect.signature(function).parameters.values())[:-1]  # all but **fields
    flags = [_config_flag(f.name, hints[f.name], docs.get(f.name, ""))
             for f in dataclasses.fields(TrainConfig)]
    function.__signature__ = inspect.Signature([*fixed, *flags])
    function.__annotations__ = {**{p.name: p.annotation for p in [*fixed, *flags]}, "return": None}
    return function


def _parse_flag(name: str, value: object) -> object:
    """Flags that hold lists arrive as text: `q_proj,v_proj` and `0.9,0.95` (or YAML) become lists."""
    import yaml

    if not isinstance(value, str) or name not in ("target_modules", "adam_betas"):
        return value
    if name == "target_modules" and "," not in value and not value.lstrip().startswith("["):
        return value
    parsed = yaml.safe_load(value if value.lstrip().startswith("[") else f"[{value}]")
    return [str(v).strip() if name == "target_modules" else v for v in parsed]


@app.command("train")
@_with_config_flags
def train_command(
    config: str | None = typer.Argument(None, help="YAML file of TrainConfig fields (flags override it)"),
    assignments: list[str] | None = typer.Option(None, "--set", help="FIELD=VALUE for any TrainConfig field"),
    nproc: int | None = typer.Option(None, "--nproc", min=1, help="training processes on this machine "
                                     "(torchrun; see --strategy); several machines: run torchrun directly"),
    **fields: object,
) -> None:
    """Fine-tune a model on a JSONL file (LoRA by default); writes a run directory. Every option is a
    field of the training config (src/tailor/config.py), also settable in the YAML."""
    from tailor.config import parse_assignments
    from tailor.train import ConfigError, NonFiniteLossError, load_config, train
    from tailor.train.distributed import launched_rank, launched_world_size

    try:
        overrides = parse_assignments(assignments or [])
        overrides.update({k: _parse_flag(k, v) for k, v in fields.items() if v is not None})
        resolved = load_config(config, **overrides)
        if nproc and nproc > 1:
            from tailor.train.run import check_before_training

            check_before_training(resolved)  # bad input stops here, before any process starts (exit 2)
            _launch_processes(nproc, config, overrides)
            return
        run_dir = train(resolved)
    except NonFiniteLossError as error:
        _train_fail(error, code=3)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        _train_fail(error)
    except Exception as error:  # a bug or a lost peer: the traceback prints; the launcher quotes the error
        if launched_world_size() > 1:
            from tailor.train.launch import record_failure

            record_failure(f"{type(error).__name__}: {error}")
        raise
    if launched_rank() == 0:
        typer.echo(f"run directory: {run_dir}")


def _launch_processes(nproc: int, config: str | None, overrides: dict) -> None:
    """`tailor train` in `nproc` processes (torchrun): the same config, the flags passed on as --set
    FIELD=VALUE (JSON is YAML, so every value reads back as it was)."""
    import json

    from tailor.train.launch import ProcessFailedError, launch

    arguments = [config] if config else []
    for name, value in overrides.items():
        arguments += ["--set", f"{name}={json.dumps(value)}"]
    try:
        launch(nproc, arguments)
    except ProcessFailedError as error:
        _train_fail(error, code=1)


@app.command("demo")
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="run directory (a previous demo there is replaced)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="override the recipe's step count"),
    eval_n: int | None = typer.Option(None, "--eval-n",
                                     help="held-out tickets to score (default all; 100 without native bf16)"),
) -> None:
    """Train on the built-in support-ticket dataset, then compare base vs tuned on held-out tickets."""
    from tailor.train import ConfigError, NonFiniteLossError
    from tailor.train.demo import run_demo

    try:
        run_demo(out, max_steps=max_steps, eval_n=eval_n)
    except NonFiniteLossError as error:
        _train_fail(error, code=3)
    except (ConfigError, ValueError) as error:
        _train_fail(error)

# --- end train / demo ---

# --- compare / sweep -------------------------------------------------------------------------------------


def _compare_config(config: str | None, recipe_config: dict) -> dict:
    """TrainConfig values for every method of a comparison: the recipe's, then the YAML's; validated."""
    from tailor.config import load_config, read_yaml_config

    values = {**recipe_config, **(read_yaml_config(config) if config else {})}
    values.pop("out", None)
    load_config(**values)  # refuse a bad config before any method runs
    return values


def _default_eval_data(values: dict) -> str:
    data = str(values.get("data") or "")
    if data.startswith("builtin:") and data.count(":") == 1:
        return f"{data}:test"
    if values.get("val_data"):
        return str(values["val_data"])
    raise ValueError("no held-out data to compare on: give --eval-data FILE.jsonl (or val_data in the "
                     "config)")


@app.command("compare")
def compare_command(
    config: str | None = typer.Argument(None, help="training config YAML shared by every method"),
    methods: str | None = typer.Option(None, "--methods", help="comma list: zero-shot, few-shot, full, "
                                       "lora-r16, qlora-r16, qlora-int8-r16 ..."),
    recipe: str | None = typer.Option(None, "--recipe", help="a preset: demo (built-in data, 7 methods)"),
    out: str = typer.Option("runs/compare", "--out", help="report directory"),
    eval_data: str | None = typer.Option(None, "--eval-data", help="held-out data (default: builtin test "
                                         "split, or the config's val_data)"),
    eval_n: int | None = typer.Option(None, "--eval-n", help="score only the first N held-out examples"),
    shots: int = typer.Option(3, "--shots", help="examples in the few-shot prompt"),
    full_lr: float | None = typer.Option(None, "--full-lr", help="lr of `full` (default: the method's)"),
    price_per_hour: float = typer.Option(1.0, "--price-per-hour", help="USD per hour of this machine"),
    margin: float = typer.Option(0.02, "--margin", help="quality margin of the decision (absolute)"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds per method before it is stopped"),
) -> None:
    """LoRA vs QLoRA vs full fine-tuning vs prompting on your data: one table, one report, one decision."""
    from tailor.compare import parse_entries, run_compare
    from tailor.compare.presets import preset
    from tailor.config import ConfigError

    try:
        chosen = preset(recipe) if recipe else {}
        values = _compare_config(config, chosen.get("config", {}))
        if not (methods or chosen.get("methods")):
            raise ValueError("name the methods to compare (--methods lora-r16,full,...) or a --recipe")
        overrides = {k: dict(v) for k, v in chosen.get("method_overrides", {}).items()}
        if full_lr is not None:
            overrides.setdefault("full", {})["lr"] = full_lr
        elif "lr" in values and not recipe:  # the config's lr is an adapter's; full keeps its own default
            overrides.setdefault("full", {}).setdefault("lr", None)
        entries = parse_entries(methods or chosen["methods"], values, shots, overrides)
        held_out = eval_data or chosen.get("eval_data") or _default_eval_data(values)
        result = run_compare(values, entries, out, held_out, eval_n or chosen.get("eval_n"), price_per_hour,
                             margin, timeout, echo=typer.echo)
    except (ConfigError, ValueError) as error:
        _use_fail(error)
    from tailor.report.compare import table_rows

    for cells in table_rows(result):
        typer.echo("  " + " | ".join(cells))
    decision = result["decision"]
    typer.echo(f"decision: {decision['reason'] if decision else 'no method produced a result'}")
    typer.echo(f"report: {out}/compare.html (compare.md, compare.json)")


@app.command("sweep")
def sweep_command(
    config: str = typer.Argument(..., help="training config YAML (the fixed settings)"),
    grid: list[str] = typer.Option(..., "--grid", help="FIELD=V1,V2 (repeat per field): rank, lora_alpha, "
                                   "lr, lora_dropout, target_modules (names joined by ;) ..."),
    sample: int | None = typer.Option(None, "--sample", help="run a seeded random subset of N points"),
    out: str = typer.Option("runs/sweep", "--out", help="sweep directory"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds per run before it is stopped"),
) -> None:
    """Train a grid of settings, rank by validation loss, write the best as a ready-to-run config."""
    from tailor.compare.sweep import parse_grid, run_sweep
    from tailor.config import ConfigError

    try:
        values = _compare_config(config, {})
        result = run_sweep(values, parse_grid(grid), out, sample, timeout, echo=typer.echo)
    except (ConfigError, ValueError) as error:
        _use_fail(error)
    typer.echo((Path(out) / "sweep.md").read_text())
    if result["best"] is None:
        raise typer.Exit(1)

# --- end compare / sweep ---

# --- eval / generate / chat (owner: models-eval) -------------------------------------------------------


def _use_fail(error: Exception) -> None:
    """Print a clear one-block error (no traceback) and exit with status 2."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _adapter_base_model(adapter: str | None) -> str | None:
    """The base model an adapter was trained on (adapter_config.json's base_model_name_or_path)."""
    import json
    from pathlib import Path

    if not adapter:
        return None
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _load_for_use(model_name: str | None, adapter: str | None, dtype: str, force: bool = False):
    """Model (+ adapter when given) and tokenizer; model defaults to the adapter's base, else the default.
    `adapter` may be a store reference (NAME@TAG)."""
    from tailor.adapters import load_adapter, read_adapter_config
    from tailor.adapters.store import locate
    from tailor.models import DEFAULT_MODEL, load_model, parse_dtype

    if adapter:
        adapter = str(locate(adapter)[0])
        read_adapter_config(adapter)  # a wrong adapter path fails here, before the slow model load
    name = model_name or _adapter_base_model(adapter) or DEFAULT_MODEL
    model, tokenizer = load_model(name, dtype=parse_dtype(dtype))
    if adapter:
        load_adapter(model, adapter, force=force)
    return model, tokenizer


_MODEL_HELP = "local HF dir, cached repo id, .gguf, or the default model"
_DTYPE_HELP = "auto (bf16 where the hardware has it) | float32 | bfloat16"
_FORCE_HELP = "load the adapter even if it was trained on another base (its fingerprint differs)"


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT format)"),
    system: str | None = typer.Option(None, "--system", help="system prompt (default: the template's)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
) -> None:
    """Answer one prompt (greedy) with the base model or with an adapter."""
    from tailor.eval import generate

    try:
        loaded, tokenizer = _load_for_use(model, adapter, dtype, force)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        typer.echo(generate(loaded, tokenizer, [messages], max_new_tokens=max_new_tokens)[0])
    except ValueError as error:
        _use_fail(error)


@app.command("chat")
def chat_command(
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT format)"),
    system: str | None = typer.Option(None, "--system", help="system prompt (default: the template's)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
) -> None:
    """Talk to the model line by line (stdin); the conversation is kept. /reset forgets it, /exit quits."""
    import sys

    from tailor.eval import generate

    try:
        loaded, tokenizer = _load_for_use(model, adapter, dtype, force)
    except ValueError as error:
        _use_fail(error)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        typer.echo("Type a message; /reset clears the conversation, /exit quits.")
    while True:
        if interactive:
            typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        answer = generate(loaded, tokenizer, [history], max_new_tokens=max_new_tokens)[0]
        history.append({"role": "assistant", "content": answer})
        typer.echo(f"model> {answer}" if interactive else answer)


@app.command("eval")
def eval_command(
    run_dir: str | None = typer.Argument(None, help="run directory (its adapter/ or model/, config.yaml)"),
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP + " (default: the run's)"),
    adapter: str | None = typer.Option(None, "--adapter", help="adapter dir (default: RUN_DIR/adapter)"),
    data: str = typer.Option("builtin:support:test", "--data", help="held-out data: file or builtin spec"),
    n: int | None = typer.Option(None, "--n", help="score only the first N examples"),
    out: str | None = typer.Option(None, "--out", help="eval.json path (default: RUN_DIR/eval.json)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="for val loss (default: the run's)"),
    retention: bool = typer.Option(True, "--retention/--no-retention", help="re-ask general prompts"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Base vs tuned on held-out data: task metrics, validation loss, capability retention -> eval.json."""
    from rich.console import Console

    from tailor.eval import evaluate_run, print_evaluation

    console = Console()
    try:
        console.print(f"evaluating {run_dir or adapter} on {data}", highlight=False, markup=False)
        result = evaluate_run(run_dir, model=model, adapter=adapter, data=data, n=n, out=out,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, max_seq_len=max_seq_len,
                              retention=retention, dtype=dtype)
    except ValueError as error:
        _use_fail(error)
    print_evaluation(result, console)

# --- end eval / generate / chat ---

# --- plan / advise (owner: plan) -----------------------------------------------------------------------

# `tailor plan`'s inputs when neither a flag nor a config gives them (TrainConfig names)
_PLAN_DEFAULTS: dict = {
    "model": "SmolLM2-135M", "method": "lora", "rank": 16, "lora_alpha": 32.0, "target_modules": "all-linear",
    "batch_size": 1, "max_seq_len": 2048, "gradient_checkpointing": True, "precision": "auto",
    "adapter_dtype": "fp32", "lora_dropout": 0.0, "grad_accum": 1, "loss_chunk_tokens": None,
}
_PLAN_DEFAULT_TOKENS = 1e7
_TOKENS_DEFAULT_BASIS = "default (--tokens 1e7); give --tokens, or max_steps in a config"


def _method_names() -> str:
    from tailor.methods import METHODS

    return " | ".join(METHODS)


def _plan_config_inputs(path: str):
    """The TrainConfig a YAML describes, validated as `tailor train PATH` validates it (unknown keys are
    refused with their line; fields the file leaves out take TrainConfig's defaults, as in training)."""
    from tailor.config import load_config, read_yaml_config

    given = read_yaml_config(path)
    return load_config(path, data=None if given.get("data") else "builtin:support")  # plan needs no data


def _this_machine_device() -> str:
    import torch  # only when --device is left out: the plan is for this machine

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_plan_inputs(config: str | None, flags: dict, tokens: float | None,
                         device: str = "cuda") -> tuple[dict, float, str]:
    """Flags over the config over plan's defaults -> (plan inputs, tokens, where the tokens come from), for
    a run on `device` (precision auto is what the run resolves it to there)."""
    from tailor.methods import METHOD_SPECS
    from tailor.plan.planner import plan_precision, train_config_inputs

    train_config = _plan_config_inputs(config) if config else None
    from_config = train_config_inputs(train_config, device) if train_config else {}
    values = {**_PLAN_DEFAULTS, "attention": "eager" if device == "cpu" else "sdpa", **from_config,
              **{k: v for k, v in flags.items() if v is not None}}
    if values["precision"] == "auto":
        values["precision"] = plan_precision("auto", values["method"], device)
    if train_config is not None and flags.get("method") is not None:  # a flag changed the config's method
        spec = METHOD_SPECS.get(values["method"])
        if flags.get("precision") is None:
            values["precision"] = plan_precision(train_config.precision, values["method"], device)
        if flags.get("lora_dropout") is None and spec is not None and spec.trains_all_weights:
            values["lora_dropout"] = 0.0  # train ignores lora_dropout when every weight trains
    if tokens is not None:
        return values, tokens, "given with --tokens"
    max_steps = train_config.max_steps if train_config else None
    if max_steps:
        b, g, s = values["batch_size"], values["grad_accum"], values["max_seq_len"]
        basis = (f"upper bound from the config's max_steps: {max_steps} steps x batch_size {b} x grad_accum "
                 f"{g} x max_seq_len {s} (sequences shorter than max_seq_len make the run shorter)")
        return values, float(max_steps * b * g * s), basis
    return values, _PLAN_DEFAULT_TOKENS, _TOKENS_DEFAULT_BASIS


@app.command("plan")
def plan_command(
    config: str | None = typer.Argument(
        None, help="a TrainConfig YAML (what `tailor train CONFIG` runs) to plan; flags override it"
    ),
    model: str | None = typer.Option(
        None, "--model", help="catalogue name, config.json, .gguf, 7B (default SmolLM2-135M)"
    ),
    method: str | None = typer.Option(None, "--method", help=f"{_method_names()} (default lora)"),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank r (default 16)"),
    lora_alpha: float | None = typer.Option(
        None, "--lora-alpha", "--alpha", help="LoRA alpha, scaling = lora_alpha / r (default 32)"
    ),
    target_modules: str | None = typer.Option(
        None, "--target-modules", help="all-linear | q_proj,v_proj (default all-linear)"
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per micro-batch (default 1)"),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", "--seq-len", help="tokens per sequence (default 2048)"
    ),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="(default on)"
    ),
    optimizer: str = typer.Option(
        "adamw", "--optimizer", help="adamw | adamw-8bit | adamw-paged | adamw-8bit-paged | sgd"
    ),
    precision: str | None = typer.Option(
        None, "--precision",
        help="bf16 | fp16 | fp32 | bf16-mixed (default bf16; a config's bf16 with method full is bf16-mixed: "
        "fp32 master weights, bf16 compute)",
    ),
    adapter_dtype: str | None = typer.Option(
        None, "--adapter-dtype", help="LoRA weights+grads+state: fp32|bf16 (default fp32)"
    ),
    lora_dropout: float | None = typer.Option(
        None, "--lora-dropout", help="> 0 keeps a mask per adapted layer (default 0)"
    ),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="NF4 4.127 or 4.5 bits"),
    loss_chunk_tokens: int | None = typer.Option(
        None, "--loss-chunk-tokens", help="tokens per CE chunk (a config's loss_chunk_size; default: one)"
    ),
    compile_loss: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile'd cross-entropy"),
    loss_upcast: bool = typer.Option(True, "--loss-upcast/--no-loss-upcast", help="fp32 log-softmax"),
    optimizer_in_backward: bool = typer.Option(
        False, "--optimizer-in-backward", help="step and free each gradient during backward"
    ),
    activation_offloading: bool = typer.Option(
        False, "--activation-offloading", help="kept activations in pinned CPU memory (torchtune)"
    ),
    quant_keeps_inputs: bool = typer.Option(
        False, "--quant-keeps-inputs", help="bitsandbytes < 0.43.2: 4-bit layers keep their inputs"
    ),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum", "--grad-accumulation",
        help="micro-batches per step; > 1: gradients alive during forward (default 1)",
    ),
    optimizer_kernel: str = typer.Option(
        "fused", "--optimizer-kernel", help="AdamW kernel: fused | foreach | for-loop"
    ),
    tokens: float | None = typer.Option(
        None, "--tokens",
        help="training tokens (all epochs) for time and cost (default: a config's max_steps x batch_size x "
        "grad_accum x max_seq_len, else 1e7)",
    ),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU from the price table to cost on"),
    mfu: float = typer.Option(0.35, "--mfu", help="assumed model FLOPs utilisation (0-1)"),
    prices: str | None = typer.Option(None, "--prices", help="YAML/JSON file overriding the GPU price table"),
    cost: bool = typer.Option(False, "--cost", help="also print the business view (storage, serving, ROI)"),
    customisations: int = typer.Option(10, "--customisations", help="--cost: N customisations to serve"),
    months: float = typer.Option(12, "--months", help="--cost: horizon in months"),
    runs_per_customisation: int = typer.Option(3, "--runs-per-customisation", help="--cost: retrains each"),
    implementation_cost: float = typer.Option(10_000, "--implementation-cost", help="--cost: one-off USD"),
    baseline_cost: float | None = typer.Option(None, "--baseline-cost", help="--cost: USD, else N full"),
    new_cost: float | None = typer.Option(None, "--new-cost", help="--cost: USD; default base + N adapters"),
    nproc: int = typer.Option(1, "--nproc", help="training processes (tailor train --nproc / torchrun): "
                              "adds the memory of each"),
    strategy: str = typer.Option("ddp", "--strategy", help="ddp (replicates) | fsdp (shards weights, "
                                 "gradients and optimizer state)"),
    device: str | None = typer.Option(
        None, "--device", help="cpu | cuda: where the run trains; its memory is planned there (RSS on a CPU) "
        "and precision auto is resolved for it (default: this machine)"),
    json_output: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Estimate memory, fit, time and cost of fine-tuning a model, from its configuration alone. With
    CONFIG (a `tailor train` YAML) it plans that run; flags override the file."""
    import json

    from tailor.config import ConfigError
    from tailor.plan import BusinessInputs, PlanError, StackOptions, plan
    from tailor.plan.render import render_plan

    flags = dict(model=model, method=method, rank=rank, lora_alpha=lora_alpha, target_modules=target_modules,
                 batch_size=batch_size, max_seq_len=max_seq_len,
                 gradient_checkpointing=gradient_checkpointing, precision=precision,
                 adapter_dtype=adapter_dtype, lora_dropout=lora_dropout, grad_accum=grad_accum,
                 loss_chunk_tokens=loss_chunk_tokens)
    device = device or _this_machine_device()
    try:
        v, tokens, tokens_basis = _resolve_plan_inputs(config, flags, tokens, device)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    options = StackOptions(adapter_dtype=v["adapter_dtype"], lora_dropout=v["lora_dropout"],
                           double_quant=double_quant, loss_chunk_tokens=v["loss_chunk_tokens"],
                           compile=compile_loss, loss_upcast=loss_upcast,
                           optimizer_in_backward=optimizer_in_backward,
                           activation_offloading=activation_offloading, quant_keeps_inputs=quant_keeps_inputs,
                           grad_accum=v["grad_accum"], optimizer_kernel=optimizer_kernel,
                           attention=v["attention"])

    business = None
    if cost:
        if implementation_cost <= 0 or customisations < 1:
            typer.echo("error: --implementation-cost must be > 0 and --customisations >= 1", err=True)
            raise typer.Exit(2)
        business = BusinessInputs(customisations=customisations, months=months,
                                  runs_per_customisation=runs_per_customisation,
                                  implementation_cost=implementation_cost, baseline_cost=baseline_cost,
                                  new_cost=new_cost)
    try:
        result = plan(v["model"], method=v["method"], rank=v["rank"], lora_alpha=v["lora_alpha"],
                      target_modules=v["target_modules"], batch_size=v["batch_size"],
                      max_seq_len=v["max_seq_len"], gradient_checkpointing=v["gradient_checkpointing"],
                      optimizer=optimizer, precision=v["precision"], tokens=tokens, gpu=gpu, mfu=mfu,
                      prices=prices, business=business, options=options, tokens_basis=tokens_basis,
                      nproc=nproc, strategy=strategy, device=device)
    except PlanError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_plan(result)


def _default_model_name() -> str:
    from tailor.config import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


@app.command("advise")
def advise_command(
    prompting_works: bool | None = typer.Option(None, "--prompting-works/--prompting-fails"),
    few_shot_works: bool | None = typer.Option(None, "--few-shot-works/--few-shot-fails"),
    needs_actions: bool | None = typer.Option(None, "--needs-tools/--no-tools", help="gap: compute/act"),
    needs_knowledge: bool | None = typer.Option(None, "--needs-knowledge/--no-knowledge",
                                                help="gap is facts from documents"),
    examples: int | None = typer.Option(None, "--examples", help="labelled examples you have"),
    large_shift: bool | None = typer.Option(None, "--large-shift/--small-shift", help="far-off domain"),
    model: str = typer.Option(
        _default_model_name(), "--model", help="the model to train (catalogue name, config.json, .gguf, 7B)"
    ),
    gpu_memory_gb: float = typer.Option(24, "--gpu-memory", help="GB of GPU memory you have"),
    max_seq_len: int = typer.Option(1024, "--max-seq-len", "--seq-len", help="tokens per sequence"),
    out: str | None = typer.Option(
        None, "--out", help="write the recipe as a TrainConfig YAML: tailor train FILE --data ... runs it"
    ),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Prompting, few-shot, tools, retrieval, LoRA or full fine-tune? And a LoRA recipe that fits, in
    TrainConfig's field names (--out writes it as a config for `tailor train` and `tailor plan`)."""
    import json
    import sys

    from tailor.files import atomic_write_text
    from tailor.plan import AdviceInputs, PlanError, advise
    from tailor.plan.advise import QUESTIONS, recipe_yaml

    inputs = AdviceInputs(prompting_works, few_shot_works, needs_actions, needs_knowledge, examples,
                          large_shift, model, gpu_memory_gb, max_seq_len)
    if sys.stdin.isatty() and not json_output:
        for name, question in QUESTIONS.items():
            if getattr(inputs, name) is None:
                setattr(inputs, name, typer.confirm(question, default=False))
                if getattr(inputs, name) and name in ("prompting_works", "few_shot_works", "needs_actions",
                                                      "needs_knowledge"):
                    break
        if inputs.examples is None and not (inputs.prompting_works or inputs.few_shot_works
                                            or inputs.needs_actions or inputs.needs_knowledge):
            inputs.examples = typer.prompt("How many labelled examples do you have?", type=int, default=500)
    try:
        advice = advise(inputs)
    except PlanError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    result = advice.to_dict()
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"Escalation order: {' -> '.join(result['escalation_order'])}")
        typer.echo(f"Answer: {result['answer']}")
        for reason in result["reasons"]:
            typer.echo(f"  - {reason}")
        for item in result["assumed"]:
            typer.echo(f"  (not answered: {item})")
        if result["recipe"]:
            typer.echo("Starting recipe (TrainConfig fields):")
            for key, value in result["recipe"].items():
                typer.echo(f"  {key}: {value}")
            typer.echo(f"  (planned peak {result['planned_peak_gib']:.1f} GiB)")
    if out is None:
        return
    try:
        atomic_write_text(out, recipe_yaml(advice, inputs))
    except (PlanError, OSError) as e:
        typer.echo(f"error: --out {out}: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote the recipe to {out}: train it with `tailor train {out} --data YOUR_DATA.jsonl`, "
               f"plan it with `tailor plan {out}`", err=json_output)

# --- end plan / advise ---


# --- adapters / combine / merge ------------------------------------------------------------------------

_STORE_HELP = "adapter store directory (default: $TAILOR_ADAPTERS, else ~/.cache/tailor/adapters)"


class _ManyValues(typer.core.TyperCommand):
    """`--adapters A B --weights 0.7 0.3`: click options take one value each, so the values after one of
    these flags (up to the next --flag) are given that flag again before click parses them."""

    many = ("--adapters", "--weights")

    def parse_args(self, ctx, args):  # noqa: D102 - click's hook
        rewritten: list[str] = []
        current = None
        for token in args:
            if token.startswith("--"):
                current = token if token in self.many else None
            elif current is not None and rewritten[-1] != current:
                rewritten.append(current)
            rewritten.append(token)
        return super().parse_args(ctx, rewritten)


@app.command("combine", cls=_ManyValues)
def combine_command(
    adapters: list[str] = typer.Option(..., "--adapters", help="adapter directories or store references "
                                       "(NAME@VERSION, NAME@TAG): --adapters DIR1 DIR2 ..."),
    weights: list[float] = typer.Option(..., "--weights", help="one weight per adapter, e.g. 0.7 0.3 "
                                        "(negative subtracts)"),
    method: str = typer.Option("cat", "--method", help="cat (exact) | linear (PEFT's, approximate) | svd "
                               "(exact sum cut to --rank) | ties | dare"),
    out: str = typer.Option(..., "--out", help="directory for the combined adapter (PEFT format)"),
    rank: int | None = typer.Option(None, "--rank", help="target rank of svd, ties, dare (default: svd the "
                                    "largest parent rank; ties/dare the sum)"),
    density: float = typer.Option(0.5, "--density", help="ties/dare: share of each update's entries kept"),
    seed: int = typer.Option(0, "--seed", help="dare: seed of the random drop"),
    force: bool = typer.Option(False, "--force", help="combine adapters whose recorded bases differ"),
    register: str | None = typer.Option(None, "--register", help="also add the result to the store as NAME"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="overall error only, not one line per module"),
) -> None:
    """Combine adapters of one base into one PEFT-format adapter (no base model needed); prints the
    relative error of the result against the weighted sum of the adapters' updates, per module and overall."""
    from tailor.adapters.combine import combine_adapters, format_result
    from tailor.adapters.store import AdapterStore, check_name, locate

    try:
        if register:
            check_name(register)
        located = [locate(a, store) for a in adapters]
        result = combine_adapters([p for p, _ in located], weights, method, out, rank, density=density,
                                  seed=seed, force=force, refs=[r for _, r in located], store=store)
        format_result(result, typer.echo, per_layer=not quiet)
        if register:
            ref, created = AdapterStore(store).add(register, out)
            typer.echo(f"{'registered as' if created else 'already in the store as'} {ref}")
    except (ValueError, OSError) as error:
        _use_fail(error)


@app.command("merge")
def merge_command(
    adapter: str = typer.Option(..., "--adapter", help="adapter directory or store reference (NAME@TAG)"),
    out: str = typer.Option(..., "--out", help="output: a directory (transformers), or a .gguf file "
                            "(--gguf)"),
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP + " (default: the adapter's base)"),
    dtype: str = typer.Option("float32", "--dtype", help="weights written: float32 (logits within 1e-4 of "
                              "the adapter's) | bfloat16 | float16"),
    base_dtype: str = typer.Option("auto", "--base-dtype", help="base weights taken as: auto (as stored) | "
                                   "float32 | bfloat16"),
    quantized: str = typer.Option("auto", "--quantized", help="base quantization the adapter was trained "
                                  "on: auto (from its metadata) | none | nf4 | int8 (dequantized before "
                                  "merging)"),
    gguf: bool = typer.Option(False, "--gguf", help="write one GGUF file (llama architecture) instead"),
    quant: str = typer.Option("f16", "--quant", help="GGUF tensor type: f16 | q8_0 | bf16 | f32"),
    verify: str = typer.Option("float64", "--verify", help="arithmetic of the logit check: float64 (limit "
                               "1e-4; a float64 copy of the model in memory) | float32"),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Fold an adapter into its base and write a plain model (transformers directory or GGUF file); checks
    on a few prompts that the result gives the adapter's logits, and prints the difference."""
    from tailor.export.merge import format_result, merge_adapter

    try:
        result = merge_adapter(adapter, out, model=model, dtype=dtype, base_dtype=base_dtype,
                               quantized=quantized, force=force, gguf=gguf, quant=quant, store=store,
                               verify=verify)
    except (ValueError, OSError) as error:
        _use_fail(error)
    format_result(result, typer.echo)


adapters_app = typer.Typer(help="The adapter store: versions, tags, lineage, rollback.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


def _store(store: str | None):
    from tailor.adapters.store import AdapterStore

    return AdapterStore(store)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@adapters_app.command("add")
def adapters_add(
    name: str = typer.Argument(..., help="adapter name (letters, digits, . _ -)"),
    directory: str = typer.Argument(..., help="a PEFT-format adapter directory (tailor's, PEFT's, a "
                                    "combination)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Import an adapter directory as the next version of NAME (NAME@1, NAME@2, ...)."""
    try:
        ref, created = _store(store).add(name, directory)
    except (ValueError, OSError) as error:
        _use_fail(error)
    typer.echo(f"added {ref}" if created else f"identical to {ref}; nothing added")


@adapters_app.command("list")
def adapters_list(
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every version: name, version, tags, base, rank, targets, size on disk, key metric."""
    import json

    try:
        rows = _store(store).rows()
    except (ValueError, OSError) as error:
        _use_fail(error)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no adapters in {_store(store).root}; add one with `tailor adapters add NAME DIR`")
        return
    header = ("ref", "tags", "base", "rank", "targets", "size", "metric")
    table = [header] + [(
        r["ref"], ",".join(r["tags"]) or "-", str(r["base"] or "-"), str(r["rank"]), r["targets"],
        _size(r["size_bytes"]), f"{r['metric'][0]}={r['metric'][1]:.4g}" if r["metric"] else "-",
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@adapters_app.command("show")
def adapters_show(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@TAG"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """The whole record of one version (store record, adapter config, tailor metadata) and its lineage."""
    import json

    try:
        target = _store(store)
        info, lineage = target.info(ref), target.lineage(ref)
    except (ValueError, OSError) as error:
        _use_fail(error)
    typer.echo(json.dumps(info, indent=2, default=str))
    typer.echo("lineage:")
    for line in lineage:
        typer.echo(f"  {line}")


@adapters_app.command("diff")
def adapters_diff(
    a: str = typer.Argument(..., help="first adapter (NAME@VERSION / NAME@TAG)"),
    b: str = typer.Argument(..., help="second adapter"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """How two adapters' configs, training, data, base and metrics differ."""
    try:
        differences = _store(store).diff(a, b)
    except (ValueError, OSError) as error:
        _use_fail(error)
    if not differences:
        typer.echo("identical: same weights, config, training, data, base and metrics")
        return
    width = max(len(key) for key, _, _ in differences)
    typer.echo(f"{'field'.ljust(width)}  {a}  |  {b}")
    for key, left, right in differences:
        typer.echo(f"{key.ljust(width)}  {left!s}  |  {right!s}")


@adapters_app.command("rm")
def adapters_rm(
    ref: str = typer.Argument(..., help="NAME@VERSION (one version) or NAME (all versions)"),
    force: bool = typer.Option(False, "--force", help="also when a tag points at it (the tag goes too)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Delete a version; refused while a tag points at it, unless --force."""
    try:
        removed = _store(store).remove(ref, force=force)
    except (ValueError, OSError) as error:
        _use_fail(error)
    typer.echo(f"removed {', '.join(removed)}")


@adapters_app.command("tag")
def adapters_tag(
    tag: str = typer.Argument(..., help="NAME@TAG, e.g. support@prod"),
    version: str = typer.Argument(..., help="the version it points at: 3, support@3, or another tag"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Point a tag at a version (atomic; the previous one is kept for rollback)."""
    try:
        previous, current = _store(store).tag(tag, version)
    except (ValueError, OSError) as error:
        _use_fail(error)
    name = tag.partition("@")[0]
    moved = f" (was {name}@{previous})" if previous not in (None, current) else ""
    typer.echo(f"{tag} -> {name}@{current}{moved}")


@adapters_app.command("rollback")
def adapters_rollback(
    tag: str = typer.Argument(..., help="NAME@TAG to move back to the version it pointed at before"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Move a tag back to its previous version (atomic, milliseconds)."""
    try:
        current, previous = _store(store).rollback(tag)
    except (ValueError, OSError) as error:
        _use_fail(error)
    name = tag.partition("@")[0]
    typer.echo(f"{tag} -> {name}@{previous} (was {name}@{current})")

# --- end adapters ---


# --- serve (owner: serve) -------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP),
    adapters: str | None = typer.Option(None, "--adapters", help="adapter root: each subdirectory is an "
                                        "adapter, served under its name"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TAILOR_API_KEY",
                                       help="Bearer key for /v1/* (or $TAILOR_API_KEY)"),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="TAILOR_ADMIN_KEY",
                                         help="Bearer key enabling adapter load/unload and route changes"),
    max_loras: int = typer.Option(8, "--max-loras", help="adapter slots: adapters computed in one batch"),
    max_lora_rank: int = typer.Option(16, "--max-lora-rank", help="the largest adapter rank served"),
    max_cpu_loras: int | None = typer.Option(None, "--max-cpu-loras", help="adapters kept in host memory "
                                             "(default: --max-loras)"),
    route: list[str] | None = typer.Option(None, "--route", help="A/B route NAME=VERSION:WEIGHT,... "
                                           "(repeat per route)"),
    max_batch: int = typer.Option(32, "--max-batch", help="requests computed together"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="the largest max_tokens a request may ask"),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", help="longest prompt "
                                                 "(default: the model's context - 1)"),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", help="larger request bodies get 413"),
    max_queue: int = typer.Option(256, "--max-queue", help="waiting requests before 429"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds per request before 504"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Serve the base model and its adapters with an OpenAI-compatible API (the request's `model`
    picks the adapter); requests for different adapters are computed in one batch."""
    try:
        from tailor.serve.server import build_server, run_server

        server = build_server(model, adapters, max_loras=max_loras, max_lora_rank=max_lora_rank,
                              max_cpu_loras=max_cpu_loras, max_batch=max_batch, dtype=dtype, routes=route,
                              api_key=api_key, admin_key=admin_key, max_tokens=max_tokens,
                              max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                              max_queue=max_queue, timeout=timeout)
    except ValueError as error:
        _use_fail(error)
    run_server(server, host=host, port=port)


@app.command("ui")
def ui_command(
    runs: str = typer.Option(..., "--runs", help="the directory your runs are in (`tailor train --out`'s)"),
    adapters: str | None = typer.Option(None, "--adapters", help="adapter store (`tailor adapters`'s "
                                        "directory): listed, tagged and served in the playground"),
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TAILOR_API_KEY",
                                       help="Bearer key for the API and the page's data"),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="TAILOR_ADMIN_KEY",
                                         help="Bearer key enabling tag changes and rollbacks from the page"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A web page for runs, comparisons, adapters, a side-by-side playground and the planner, served by
    the `tailor serve` app (its OpenAI-compatible API stays at /v1); open http://HOST:PORT/ui."""
    try:
        from tailor.serve.server import build_server, run_server
        from tailor.ui import RunIndex, add_ui

        index = RunIndex(runs)  # a wrong --runs is said before the model loads
        server = add_ui(build_server(model, adapters, dtype=dtype, api_key=api_key, admin_key=admin_key),
                        index, adapters)
    except ValueError as error:
        _use_fail(error)
    typer.echo(f"tailor ui: http://{host}:{port}/ui")
    run_server(server, host=host, port=port)

# --- end serve ---

# --- env -------------------------------------------------------------------------------------------------


@app.command("env")
def env_command(
    json_output: bool = typer.Option(False, "--json", help="print one JSON object (and nothing else)"),
) -> None:
    """What to paste into a bug report, and what to expect here: versions, device, CPU capability and
    flags, native bf16, what precision auto runs, measured matmul GFLOPS (about 2 s), cache folders."""
    import json

    from tailor.environment import describe, format_report

    info = describe()
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    for line in format_report(info):
        typer.echo(line)

# --- end env ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
