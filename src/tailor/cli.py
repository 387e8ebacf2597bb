"""The `tailor` command line. Each command is a thin shell over a function of the package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tailor",
    help="Adapt an open language model to your task on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- train / demo (owner: train) ----------------------------------------------------------------------


def _train_fail(error: Exception, code: int = 2) -> None:
    """Print a clear one-block error (no traceback) and exit."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.command("train")
def train_command(
    config: str | None = typer.Argument(None, help="YAML file of TrainConfig fields (flags override it)"),
    model: str | None = typer.Option(None, "--model", help="local HF dir, cached repo id, .gguf, or default"),
    data: str | None = typer.Option(None, "--data", help="training JSONL/JSON file, or builtin:support"),
    val_data: str | None = typer.Option(None, "--val-data", help="validation file (default: part of --data)"),
    out: str | None = typer.Option(None, "--out", help="run directory (default runs/<name>)"),
    name: str | None = typer.Option(None, "--name", help="run name"),
    method: str | None = typer.Option(None, "--method", help="lora | full"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="optimizer steps (default: epochs)"),
    epochs: float | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    grad_accum: int | None = typer.Option(None, "--grad-accum"),
    lr: float | None = typer.Option(None, "--lr"),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank r"),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (scaling alpha/r)"),
    target_modules: str | None = typer.Option(None, "--target-modules",
                                              help="all-linear, a regex, or q_proj,v_proj"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    precision: str | None = typer.Option(None, "--precision", help="bf16 | fp32"),
    seed: int | None = typer.Option(None, "--seed"),
    eval_every: int | None = typer.Option(None, "--eval-every"),
    save_every: int | None = typer.Option(None, "--save-every"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in the run dir"),
    assignments: list[str] | None = typer.Option(None, "--set", help="FIELD=VALUE for any TrainConfig field"),
) -> None:
    """Fine-tune a model on a JSONL file (LoRA by default); writes a run directory."""
    from tailor.config import parse_assignments
    from tailor.train import ConfigError, NonFiniteLossError, load_config, train

    if target_modules and "," in target_modules:
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]  # type: ignore[assignment]
    flags = dict(model=model, data=data, val_data=val_data, out=out, name=name, method=method,
                 max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                 rank=rank, lora_alpha=lora_alpha, target_modules=target_modules, max_seq_len=max_seq_len,
                 precision=precision, seed=seed, eval_every=eval_every, save_every=save_every,
                 resume=resume or None)
    try:
        overrides = parse_assignments(assignments or [])
        overrides.update({k: v for k, v in flags.items() if v is not None})
        run_dir = train(load_config(config, **overrides))
    except NonFiniteLossError as error:
        _train_fail(error, code=3)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        _train_fail(error)
    typer.echo(f"run directory: {run_dir}")


@app.command("demo")
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="run directory (a previous demo there is replaced)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="override the recipe's step count"),
    eval_n: int | None = typer.Option(None, "--eval-n", help="held-out examples to score (default: all)"),
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


def _load_for_use(model_name: str | None, adapter: str | None, dtype: str):
    """Model (+ adapter when given) and tokenizer; model defaults to the adapter's base, else the default."""
    from pathlib import Path

    from tailor.adapters import load_adapter
    from tailor.models import DEFAULT_MODEL, load_model, parse_dtype

    if adapter and not (Path(adapter) / "adapter_config.json").is_file():  # before the slow model load
        raise ValueError(f"{adapter} is not an adapter directory (no adapter_config.json in it).")
    name = model_name or _adapter_base_model(adapter) or DEFAULT_MODEL
    model, tokenizer = load_model(name, dtype=parse_dtype(dtype))
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


_MODEL_HELP = "local HF dir, cached repo id, .gguf, or the default model"
_DTYPE_HELP = "auto (bf16 where the hardware has it) | float32 | bfloat16"


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str | None = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT format)"),
    system: str | None = typer.Option(None, "--system", help="system prompt (default: the template's)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Answer one prompt (greedy) with the base model or with an adapter."""
    from tailor.eval import generate

    try:
        loaded, tokenizer = _load_for_use(model, adapter, dtype)
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
) -> None:
    """Talk to the model line by line (stdin); the conversation is kept. /reset forgets it, /exit quits."""
    import sys

    from tailor.eval import generate

    try:
        loaded, tokenizer = _load_for_use(model, adapter, dtype)
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


def _run_config(run_dir: str) -> dict:
    from pathlib import Path

    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        values = {}
    return values if isinstance(values, dict) else {}


@app.command("eval")
def eval_command(
    run_dir: str | None = typer.Argument(None, help="run directory (uses its adapter/ and config.yaml)"),
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
    from pathlib import Path

    from rich.console import Console

    from tailor.data import load_examples
    from tailor.eval import compare_base_and_tuned, compare_models, render_comparison, write_eval_json
    from tailor.eval.render import render_retention
    from tailor.models import DEFAULT_MODEL, load_model, parse_dtype

    config = _run_config(run_dir) if run_dir else {}
    full_model = Path(run_dir) / "model" if run_dir and not adapter else None
    if run_dir and not adapter and (Path(run_dir) / "adapter").is_dir():
        adapter, full_model = str(Path(run_dir) / "adapter"), None
    if not adapter and not (full_model and full_model.is_dir()):
        _use_fail(ValueError(
            f"nothing to compare: {'no adapter/ or model/ in ' + run_dir if run_dir else 'no RUN_DIR'}; "
            "pass a run directory or --adapter DIR."))
    base_name = model or config.get("model") or _adapter_base_model(adapter) or DEFAULT_MODEL
    console = Console()
    try:
        examples = load_examples(data)[: n if n else None]
        seq_len = max_seq_len or int(config.get("max_seq_len") or 1024)
        settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_seq_len=seq_len,
                        retention=retention)
        console.print(f"evaluating {base_name} vs {adapter or full_model} on {len(examples)} examples "
                      f"of {data}", highlight=False)
        if adapter:
            loaded, tokenizer = _load_for_use(base_name, adapter, dtype)
            result = compare_base_and_tuned(loaded, tokenizer, examples, **settings)
        else:
            base, tokenizer = load_model(base_name, dtype=parse_dtype(dtype))
            tuned, _ = load_model(str(full_model), dtype=parse_dtype(dtype))
            result = compare_models(base, tuned, tokenizer, examples, **settings)
    except ValueError as error:
        _use_fail(error)
    result.update(model=base_name, adapter=str(adapter or full_model), data=data)
    target = Path(out) if out else (Path(run_dir) / "eval.json" if run_dir else Path("eval.json"))
    write_eval_json(result, target)
    if run_dir and target.resolve() == (Path(run_dir) / "eval.json").resolve():
        from tailor.report import write_report

        write_report(Path(run_dir))  # report.md picks up the new eval.json
    console.print(render_comparison(result))
    if result.get("retention"):
        console.print(render_retention(result))
    for sample in result["samples"][:1]:
        console.print("example:", sample["prompt"], highlight=False, markup=False)
        for side in ("base", "tuned", "reference"):
            text = " ".join(sample[side].split())
            console.print(f"  {side:>9}: {text[:200]}{'...' if len(text) > 200 else ''}", highlight=False,
                          markup=False)
    console.print(f"wrote {target}", highlight=False, markup=False)

# --- end eval / generate / chat ---

# --- plan / advise (owner: plan) -----------------------------------------------------------------------


@app.command("plan")
def plan_command(
    model: str = typer.Option("SmolLM2-135M", "--model", help="catalogue name, config.json, .gguf, 7B"),
    method: str = typer.Option("lora", "--method", help="full | lora | qlora-nf4 | qlora-int8"),
    rank: int = typer.Option(16, "--rank", help="LoRA rank r"),
    alpha: float = typer.Option(32, "--alpha", help="LoRA alpha (scaling = alpha / r)"),
    target_modules: str = typer.Option("all-linear", "--target-modules", help="all-linear | q_proj,v_proj"),
    batch_size: int = typer.Option(1, "--batch-size"),
    seq_len: int = typer.Option(2048, "--seq-len"),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    optimizer: str = typer.Option(
        "adamw", "--optimizer", help="adamw | adamw-8bit | adamw-paged | adamw-8bit-paged | sgd"
    ),
    precision: str = typer.Option("bf16", "--precision", help="bf16 | fp16 | fp32 | bf16-mixed"),
    adapter_dtype: str = typer.Option("fp32", "--adapter-dtype", help="LoRA weights+grads+state: fp32|bf16"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="> 0 keeps a mask per adapted layer"),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="NF4 4.127 or 4.5 bits"),
    loss_chunk_tokens: int | None = typer.Option(None, "--loss-chunk-tokens", help="tokens per CE chunk"),
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
    grad_accumulation: int = typer.Option(
        1, "--grad-accumulation", help="micro-batches per step (>1: gradients alive during forward)"
    ),
    optimizer_kernel: str = typer.Option(
        "fused", "--optimizer-kernel", help="AdamW kernel: fused | foreach | for-loop"
    ),
    tokens: float = typer.Option(1e7, "--tokens", help="training tokens (all epochs) for time and cost"),
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
    json_output: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Estimate memory, fit, time and cost of fine-tuning a model, from its configuration alone."""
    import json

    from tailor.plan import BusinessInputs, PlanError, StackOptions, plan
    from tailor.plan.render import render_plan

    options = StackOptions(adapter_dtype=adapter_dtype, lora_dropout=lora_dropout, double_quant=double_quant,
                           loss_chunk_tokens=loss_chunk_tokens, compile=compile_loss, loss_upcast=loss_upcast,
                           optimizer_in_backward=optimizer_in_backward,
                           activation_offloading=activation_offloading, quant_keeps_inputs=quant_keeps_inputs,
                           grad_accumulation=grad_accumulation, optimizer_kernel=optimizer_kernel)

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
        result = plan(model, method=method, rank=rank, alpha=alpha, target_modules=target_modules,
                      batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                      optimizer=optimizer, precision=precision, tokens=tokens, gpu=gpu, mfu=mfu,
                      prices=prices, business=business, options=options)
    except PlanError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_plan(result)


@app.command("advise")
def advise_command(
    prompting_works: bool | None = typer.Option(None, "--prompting-works/--prompting-fails"),
    few_shot_works: bool | None = typer.Option(None, "--few-shot-works/--few-shot-fails"),
    needs_actions: bool | None = typer.Option(None, "--needs-tools/--no-tools", help="gap: compute/act"),
    needs_knowledge: bool | None = typer.Option(None, "--needs-knowledge/--no-knowledge",
                                                help="gap is facts from documents"),
    examples: int | None = typer.Option(None, "--examples", help="labelled examples you have"),
    large_shift: bool | None = typer.Option(None, "--large-shift/--small-shift", help="far-off domain"),
    model: str = typer.Option("SmolLM2-135M", "--model"),
    gpu_memory_gb: float = typer.Option(24, "--gpu-memory", help="GB of GPU memory you have"),
    seq_len: int = typer.Option(1024, "--seq-len"),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Prompting, few-shot, tools, retrieval, LoRA or full fine-tune? And a LoRA recipe that fits."""
    import json
    import sys

    from tailor.plan import AdviceInputs, PlanError, advise
    from tailor.plan.advise import QUESTIONS

    inputs = AdviceInputs(prompting_works, few_shot_works, needs_actions, needs_knowledge, examples,
                          large_shift, model, gpu_memory_gb, seq_len)
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
        result = advise(inputs).to_dict()
    except PlanError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"Escalation order: {' -> '.join(result['escalation_order'])}")
    typer.echo(f"Answer: {result['answer']}")
    for reason in result["reasons"]:
        typer.echo(f"  - {reason}")
    for item in result["assumed"]:
        typer.echo(f"  (not answered: {item})")
    if result["recipe"]:
        typer.echo("Starting recipe:")
        for key, value in result["recipe"].items():
            typer.echo(f"  {key}: {value}")

# --- end plan / advise ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
