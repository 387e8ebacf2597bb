"""`tailor plan` and `tailor advise`: what a run will cost before renting a machine, and which way of
adapting a model to take."""

from __future__ import annotations

import typer

from tailor.cli.app import app, fail

# `tailor plan`'s inputs when neither a flag nor a config gives them (TrainConfig names)
_PLAN_DEFAULTS: dict = {
    "model": "SmolLM2-135M", "method": "lora", "rank": 16, "lora_alpha": 32.0, "target_modules": "all-linear",
    "batch_size": 1, "max_seq_len": 2048, "gradient_checkpointing": True, "precision": "bf16",
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


def _resolve_plan_inputs(config: str | None, flags: dict, tokens: float | None) -> tuple[dict, float, str]:
    """Flags over the config over plan's defaults -> (plan inputs, tokens, where the tokens come from)."""
    from tailor.methods import METHOD_SPECS
    from tailor.plan.planner import plan_precision, train_config_inputs

    train_config = _plan_config_inputs(config) if config else None
    from_config = train_config_inputs(train_config) if train_config else {}
    values = {**_PLAN_DEFAULTS, **from_config, **{k: v for k, v in flags.items() if v is not None}}
    if train_config is not None and flags.get("method") is not None:  # a flag changed the config's method
        spec = METHOD_SPECS.get(values["method"])
        if flags.get("precision") is None:
            values["precision"] = plan_precision(train_config.precision, values["method"])
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
    try:
        v, tokens, tokens_basis = _resolve_plan_inputs(config, flags, tokens)
    except ConfigError as e:
        fail(e)
    options = StackOptions(adapter_dtype=v["adapter_dtype"], lora_dropout=v["lora_dropout"],
                           double_quant=double_quant, loss_chunk_tokens=v["loss_chunk_tokens"],
                           compile=compile_loss, loss_upcast=loss_upcast,
                           optimizer_in_backward=optimizer_in_backward,
                           activation_offloading=activation_offloading, quant_keeps_inputs=quant_keeps_inputs,
                           grad_accum=v["grad_accum"], optimizer_kernel=optimizer_kernel)

    business = None
    if cost:
        if implementation_cost <= 0 or customisations < 1:
            fail("--implementation-cost must be > 0 and --customisations >= 1")
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
                      nproc=nproc, strategy=strategy)
    except PlanError as e:
        fail(e)
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
        fail(e)
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
        fail(f"--out {out}: {e}")
    typer.echo(f"wrote the recipe to {out}: train it with `tailor train {out} --data YOUR_DATA.jsonl`, "
               f"plan it with `tailor plan {out}`", err=json_output)
