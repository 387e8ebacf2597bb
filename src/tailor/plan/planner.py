"""`tailor plan`: validate the request, then put params, memory, fit, time and cost into one result."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tailor.config.sections import lora_shape_problems
from tailor.methods import METHOD_SPECS, METHODS, method_spec
from tailor.names import BASE_DTYPE_AT_FP32, BASE_DTYPES, STRATEGIES
from tailor.plan.catalogue import Architecture, PlanError, resolve_model
from tailor.plan.cost import (
    PriceTable,
    gpus_needed,
    load_price_table,
    serving_gpus,
    training_flops_per_token,
    training_hours,
)
from tailor.plan.memory import (
    ADAPTER_DTYPES,
    ATTENTIONS,
    DEVICES,
    GIB,
    PRECISIONS,
    TrainingSetup,
    adapter_file_bytes,
    estimate_memory,
    trainable_parameters,
)
from tailor.plan.optimizer import OPTIMIZER_KERNELS, OPTIMIZERS, TRAIN_OPTIMIZERS
from tailor.plan.params import count_parameters, resolve_targets
from tailor.plan.processes import per_process_memory

if TYPE_CHECKING:
    from tailor.config import TrainConfig

COMMON_SIZES_GB = (8, 12, 16, 24, 40, 48, 80, 141)
TOKENS_GIVEN = "given with --tokens (all epochs)"


@dataclass(frozen=True)
class StackOptions:
    """How the training stack spends memory (each one a `tailor plan` flag; see memory.py's docstring)."""

    adapter_dtype: str = "fp32"  # dtype of LoRA weights, their gradients and AdamW state
    lora_dropout: float = 0.0  # > 0 keeps a dropout output and a mask per adapted layer
    double_quant: bool = True  # NF4 with a quantised absmax (4.127 bits) or without (4.5 bits)
    loss_chunk_tokens: int | None = None  # tokens per cross-entropy chunk; None: one unchunked loss
    compile: bool = False  # torch.compile'd loss keeps compute-dtype logits instead of fp32 log-softmax
    loss_upcast: bool = True  # the loss upcasts logits to fp32 (LitGPT's 2023 chunked loss did not)
    optimizer_in_backward: bool = False  # step and free each gradient in backward
    activation_offloading: bool = False  # kept activations in pinned CPU memory
    quant_keeps_inputs: bool = False  # bitsandbytes < 0.43.2: 4-bit layers keep their inputs
    grad_accum: int = 1  # micro-batches per step; after the first, all gradients are alive in forward
    optimizer_kernel: str = "fused"  # torch AdamW kernel: fused (tailor's trainer), foreach, for-loop
    attention: str = "sdpa"  # sdpa keeps no s x s matrix; eager (tailor's trainer on CPU) keeps the softmax
    base_dtype: str | None = None  # LoRA's frozen base stored in bf16 at fp32 compute (None: as precision)


@dataclass(frozen=True)
class BusinessInputs:
    """Inputs of the --cost view (each one a CLI flag; defaults documented in docs/planning.md)."""

    customisations: int = 10  # N customers / tasks, each needing its own model behaviour
    months: float = 12  # horizon for serving and storage
    serving_hours_per_month: float = 730  # 24/7
    runs_per_customisation: int = 3  # training runs per customisation over the horizon (retrains)
    implementation_cost: float = 10_000  # one-off engineering cost of adopting adapters (USD)
    baseline_cost: float | None = None  # USD over the horizon; default: N full fine-tuned models
    new_cost: float | None = None  # USD over the horizon; default: one base + N adapters


def validate(
    method: str,
    rank: int,
    lora_alpha: float,
    batch_size: int,
    max_seq_len: int,
    optimizer: str,
    precision: str,
    mfu: float = 0.35,
    tokens: float = 1e7,
    options: StackOptions = StackOptions(),
) -> list[str]:
    """Every problem with the numeric/choice inputs, as readable lines (empty when all is well)."""
    problems = []
    o = options
    spec = METHOD_SPECS.get(method)  # None: an unknown method, reported below with the valid names
    trains_all_weights = spec is not None and spec.trains_all_weights
    if o.adapter_dtype not in ADAPTER_DTYPES:
        problems.append(f"--adapter-dtype {o.adapter_dtype!r} is unknown; valid: {', '.join(ADAPTER_DTYPES)}")
    if not 0 <= o.lora_dropout < 1:
        problems.append(f"--lora-dropout {o.lora_dropout}: a probability in [0, 1) (0.05-0.1 is usual)")
    if o.grad_accum < 1:
        problems.append(f"--grad-accum {o.grad_accum}: must be >= 1 (1 = no accumulation)")
    if o.optimizer_kernel not in OPTIMIZER_KERNELS:
        problems.append(f"--optimizer-kernel {o.optimizer_kernel!r} is unknown; valid: "
                        f"{', '.join(OPTIMIZER_KERNELS)}")
    if o.loss_chunk_tokens is not None and o.loss_chunk_tokens < 1:
        problems.append(f"--loss-chunk-tokens {o.loss_chunk_tokens}: must be >= 1 (or leave it out)")
    if o.quant_keeps_inputs and method != "qlora-nf4":
        problems.append(f"--quant-keeps-inputs describes bitsandbytes' 4-bit layers; use it with qlora-nf4, "
                        f"not {method}")
    if trains_all_weights and o.lora_dropout > 0:
        problems.append(f"--lora-dropout with --method {method}: there is no adapter to drop out")
    if method not in METHODS:
        problems.append(f"--method {method!r} is unknown; valid: {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer {optimizer!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    if precision not in PRECISIONS:
        problems.append(f"--precision {precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
    problems += lora_shape_problems(None if trains_all_weights else rank, lora_alpha,
                                    lambda name, value: f"--{name.replace('_', '-')} {value}:")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: must be >= 1")
    if max_seq_len < 1:
        problems.append(f"--max-seq-len {max_seq_len}: must be >= 1")
    if not 0 < mfu <= 1:
        problems.append(f"--mfu {mfu}: a utilisation between 0 and 1 (0.3-0.5 is typical)")
    if tokens <= 0:
        problems.append(f"--tokens {tokens}: must be > 0")
    if spec is not None and spec.quantized_bits and precision == "bf16-mixed":
        problems.append(f"--precision {precision} with {method}: QLoRA computes in bf16, fp16 or fp32 (the "
                        "quantized base has no fp32 master weights to mix with)")
    if o.attention not in ATTENTIONS:
        problems.append(f"--attention {o.attention!r} is unknown; valid: {', '.join(ATTENTIONS)}")
    return problems


def plan_precision(train_precision: str, method: str, device: str = "cuda") -> str:
    """TrainConfig's precision in the planner's terms, on `device` ("cuda" or "cpu"). Train's bf16 is a
    bf16 frozen base with fp32 adapters for adapter methods (planner: bf16, adapter_dtype fp32) and fp32
    master weights with bf16 autocast for full fine-tuning (planner: bf16-mixed); fp32 is fp32 throughout.
    auto is what the run will resolve it to: on CUDA bf16 (every GPU of the price table computes bf16
    natively), on a CPU what tailor.hardware decides for this machine's CPU (fp32 without native bf16)."""
    spec = METHOD_SPECS.get(method)
    if train_precision == "auto":
        train_precision = "bf16" if device != "cpu" else _cpu_auto_precision()
    if train_precision == "bf16" and spec is not None and spec.trains_all_weights:
        return "bf16-mixed"
    return train_precision


def plan_base_dtype(base_dtype: str, precision: str, method: str) -> str | None:
    """The storage dtype of the run's frozen base at the planner's `precision` fp32 (tailor.hardware's
    resolve_base_dtype, without torch): for an unquantized adapter method base_dtype as given, auto being
    BASE_DTYPE_AT_FP32 (bf16); None where the precision alone says it (bf16, QLoRA, full fine-tuning)."""
    if base_dtype not in BASE_DTYPES:
        raise PlanError(f"--base-dtype {base_dtype!r} is unknown; valid: {', '.join(BASE_DTYPES)}")
    spec = METHOD_SPECS.get(method)
    if spec is None or spec.trains_all_weights or spec.quantized_bits or precision != "fp32":
        return None
    return BASE_DTYPE_AT_FP32 if base_dtype == "auto" else base_dtype


def _cpu_auto_precision() -> str:
    from tailor.hardware import precision_for  # imports torch: only when a CPU run's auto is resolved

    return precision_for("auto", "cpu")


def train_config_inputs(config: TrainConfig, device: str = "cuda") -> dict:
    """The planner's inputs (plan()'s keyword names, which are TrainConfig's) for the run `tailor train`
    makes with `config` on `device`: its shapes, precision in the planner's terms, fp32 adapters, the
    trainer's chunked loss (loss_chunk_size rows of the output head at a time), torch AdamW (fused), and
    on a CPU eager attention (tailor.methods.base: faster there than SDPA)."""
    targets = config.target_modules
    trains_all = config.method in METHOD_SPECS and method_spec(config.method).trains_all_weights
    return dict(
        model=config.model,
        method=config.method,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=targets if isinstance(targets, str) else ",".join(targets),
        batch_size=config.batch_size,
        max_seq_len=config.max_seq_len,
        gradient_checkpointing=config.gradient_checkpointing,
        precision=(precision := plan_precision(config.precision, config.method, device)),
        base_dtype=plan_base_dtype(config.base_dtype, precision, config.method),
        adapter_dtype="fp32",
        attention="eager" if device == "cpu" else "sdpa",
        lora_dropout=0.0 if trains_all else config.lora_dropout,  # train ignores it when every weight trains
        grad_accum=config.grad_accum,
        loss_chunk_tokens=config.loss_chunk_size,
        optimizer=TRAIN_OPTIMIZERS.get(config.optimizer, config.optimizer),
    )


def train_config_setup(config: TrainConfig, device: str = "cuda") -> TrainingSetup:
    """The TrainingSetup of the run `tailor train` makes with `config` on `device` (unvalidated)."""
    inputs = train_config_inputs(config, device)
    targets = inputs["target_modules"]
    trains_all = method_spec(config.method).trains_all_weights
    return TrainingSetup(
        method=config.method,
        rank=0 if trains_all else inputs["rank"],
        lora_alpha=inputs["lora_alpha"],
        target_modules=targets if targets == "all-linear" else tuple(targets.split(",")),
        # a preference objective runs the chosen and the rejected answer of each pair: twice the rows
        batch_size=inputs["batch_size"] * (2 if config.objective != "sft" else 1),
        max_seq_len=inputs["max_seq_len"],
        gradient_checkpointing=inputs["gradient_checkpointing"],
        precision=inputs["precision"],
        adapter_dtype=inputs["adapter_dtype"],
        lora_dropout=inputs["lora_dropout"],
        grad_accum=inputs["grad_accum"],
        loss_chunk_tokens=inputs["loss_chunk_tokens"],
        attention=inputs["attention"],
        base_dtype=inputs["base_dtype"],
        optimizer=inputs["optimizer"],
    )


def planned_peak_gib(config: TrainConfig, device: str, model_config: str | None = None) -> float | None:
    """The peak memory `tailor plan` predicts for the run `config` makes on `device` (GiB; on a CPU the
    process's peak RSS, on CUDA its peak allocation plus overhead), from `model_config` (a config.json;
    default: what config.model names). None where the model's architecture cannot be planned."""
    try:
        arch = resolve_model(model_config or config.model)
        estimate = estimate_memory(arch, train_config_setup(config, device), device)
        # DPO over a full fine-tune keeps a frozen copy of the model as its reference (tailor.loss.preference)
        # LoRA's reference is the same weights with the adapter off, or a second adapter (negligible)
        copy = estimate.frozen_weights + estimate.adapter_weights if (
            config.objective == "dpo" and method_spec(config.method).trains_all_weights) else 0.0
        return (estimate.total + copy) / GIB
    except (PlanError, ValueError, KeyError):
        return None


def make_setup(
    arch: Architecture,
    method: str = "lora",
    rank: int = 16,
    lora_alpha: float = 32,
    target_modules: str = "all-linear",
    batch_size: int = 1,
    max_seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    precision: str = "bf16",
    mfu: float = 0.35,
    tokens: float = 1e7,
    options: StackOptions = StackOptions(),
) -> TrainingSetup:
    optimizer = TRAIN_OPTIMIZERS.get(optimizer, optimizer)  # `tailor train`'s spelling is accepted too
    problems = validate(method, rank, lora_alpha, batch_size, max_seq_len, optimizer, precision, mfu, tokens,
                        options)
    targets: str | tuple[str, ...] = target_modules
    if target_modules != "all-linear":
        targets = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    if method in METHODS and not method_spec(method).trains_all_weights:
        try:
            resolve_targets(arch, targets if isinstance(targets, str) else list(targets))
        except PlanError as e:
            problems.append(f"--target-modules: {e}")
    if problems:
        raise PlanError("cannot plan:\n  " + "\n  ".join(problems))
    return TrainingSetup(
        method=method,
        rank=rank if not method_spec(method).trains_all_weights else 0,
        lora_alpha=lora_alpha,
        target_modules=targets,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        precision=precision,
        **options.__dict__,
    )


def plan(
    model: str,
    method: str = "lora",
    rank: int = 16,
    lora_alpha: float = 32,
    target_modules: str = "all-linear",
    batch_size: int = 1,
    max_seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    precision: str = "bf16",
    tokens: float = 1e7,
    gpu: str | None = None,
    mfu: float = 0.35,
    prices: str | None = None,
    business: BusinessInputs | None = None,
    options: StackOptions = StackOptions(),
    tokens_basis: str | None = None,
    nproc: int = 1,
    strategy: str = "ddp",
    device: str = "cuda",
) -> dict:
    """The whole plan as a JSON-ready dict (see docs/planning.md for every field). `tokens_basis` says
    where `tokens` comes from (default: given with --tokens); `nproc` > 1 adds the memory of each of
    that many training processes under `strategy` (ddp or fsdp). `device` is where the run trains: its
    memory is planned there ("cpu": the process's RSS); the GPU table always plans CUDA memory."""
    if device not in DEVICES:
        raise PlanError(f"--device {device!r} is unknown; valid: {', '.join(DEVICES)}")
    if nproc < 1 or strategy not in STRATEGIES:
        raise PlanError(f"--nproc {nproc} must be >= 1 and --strategy {strategy!r} one of "
                        f"{', '.join(STRATEGIES)}")
    try:
        arch = resolve_model(model)
    except PlanError as e:
        # report the model problem together with every other bad value, not one at a time
        problems = [
            f"--model: {e}",
            *validate(method, rank, lora_alpha, batch_size, max_seq_len, optimizer, precision, mfu, tokens,
                      options),
        ]
        raise PlanError("cannot plan:\n  " + "\n  ".join(problems)) from None
    setup = make_setup(
        arch,
        method,
        rank,
        lora_alpha,
        target_modules,
        batch_size,
        max_seq_len,
        gradient_checkpointing,
        optimizer,
        precision,
        mfu,
        tokens,
        options,
    )
    table = load_price_table(prices)
    if gpu is not None and gpu not in table.gpus:
        raise PlanError(f"--gpu {gpu!r} is not in the price table; valid: {', '.join(table.gpus)}")
    result = plan_for(arch, setup, table, tokens=tokens, gpu=gpu, mfu=mfu, business=business,
                      tokens_basis=tokens_basis, device=device)
    if nproc > 1:
        parts = per_process_memory(arch, setup, estimate_memory(arch, setup, device), nproc, strategy)
        result["processes"] = {k: v / GIB if isinstance(v, float) else v for k, v in parts.items()}
    return result


def plan_for(
    arch: Architecture,
    setup: TrainingSetup,
    table: PriceTable,
    tokens: float = 1e7,
    gpu: str | None = None,
    mfu: float = 0.35,
    business: BusinessInputs | None = None,
    tokens_basis: str | None = None,
    device: str = "cuda",
) -> dict:
    counts = count_parameters(arch)
    trainable = trainable_parameters(arch, setup)
    gpu_memory = estimate_memory(arch, setup, "cuda")  # what decides the fit on each GPU of the table
    memory = gpu_memory if device == "cuda" else estimate_memory(arch, setup, device)
    flops = training_flops_per_token(arch, setup, trainable)
    fits = []
    for g in table.gpus.values():
        n = gpus_needed(gpu_memory, g)
        hours = training_hours(flops, tokens, g, n, mfu, setup.method) if n else None
        fits.append(
            {
                "gpu": g.name,
                "memory_gb": g.memory_gb,
                "gpus_needed": n,
                "fits_on_one": n == 1,
                "hours": hours,
                "cost_usd": hours * n * g.price_per_hour if n else None,
                "price_per_hour": g.price_per_hour,
            }
        )
    by_size = {}
    for size in COMMON_SIZES_GB:
        same = [f for f in fits if f["memory_gb"] == size and f["gpus_needed"]]
        by_size[f"{size}GB"] = min((f["gpus_needed"] for f in same), default=None)
    chosen = _choose(fits, gpu)
    result = {
        "model": arch.name,
        "model_source": arch.source,
        "assumption": arch.assumption,
        "architecture": arch.to_dict(),
        "setup": {**setup.__dict__, "target_modules": _targets_str(setup)},
        "total_params": counts.total,
        "trainable_params": trainable,
        "trainable_percent": 100 * trainable / counts.total,
        "device": device,
        "memory_gib": memory.gib(),
        "host_memory_gib": memory.host_gib(),
        "peak_phase": memory.peak_phase,
        "all_gradients_gib": memory.all_gradients / GIB,
        "adapter_file_mib": adapter_file_bytes(arch, setup) / 2**20,
        "full_copy_gib": counts.total * 2 / GIB,
        "flops_per_token": flops,
        "tokens": tokens,
        "tokens_basis": tokens_basis or TOKENS_GIVEN,
        "mfu": mfu,
        "gpus": fits,
        "gpus_needed_by_memory_size": by_size,
        "chosen_gpu": chosen,
        "prices_source": table.source,
    }
    if business is not None:
        result["business"] = business_view(arch, setup, table, fits, chosen, tokens, mfu, business)
    return result


def _targets_str(setup: TrainingSetup) -> str:
    if not setup.is_lora:
        return "(all parameters)"
    t = setup.target_modules
    return t if isinstance(t, str) else ",".join(t)


def _choose(fits: list[dict], gpu: str | None) -> dict | None:
    """The named GPU, else the cheapest run among GPUs that hold it on one card."""
    if gpu is not None:
        return next(f for f in fits if f["gpu"] == gpu)
    single = [f for f in fits if f["gpus_needed"] == 1]
    pool = single or [f for f in fits if f["gpus_needed"]]
    return min(pool, key=lambda f: f["cost_usd"]) if pool else None


def business_view(
    arch: Architecture,
    setup: TrainingSetup,
    table: PriceTable,
    fits: list[dict],
    chosen: dict | None,
    tokens: float,
    mfu: float,
    b: BusinessInputs,
) -> dict:
    """Training cost per run, storage, serving N customisations two ways, and ROI with its inputs."""
    if chosen is None:
        raise PlanError(
            "--cost: no GPU in the price table holds this run; lower --batch-size/--max-seq-len, "
            "use qlora-nf4, or add a bigger GPU with --prices"
        )
    gpu = table.gpus[chosen["gpu"]]
    counts = count_parameters(arch)
    full_bytes = counts.total * 2  # a bf16 copy of the whole model
    adapter_bytes = adapter_file_bytes(arch, setup) if setup.is_lora else full_bytes
    hours_total = b.serving_hours_per_month * b.months
    # the same stack (batch, checkpointing, optimizer, loss, offloading) training every weight
    full_setup = replace(setup, method="full", rank=0, lora_dropout=0.0, quant_keeps_inputs=False)
    full_memory = estimate_memory(arch, full_setup)
    full_flops = training_flops_per_token(arch, full_setup, counts.total)
    full_options = [(gpus_needed(full_memory, g), g) for g in table.gpus.values()]
    full_options = [(n, g) for n, g in full_options if n]
    full_run = min(
        (
            training_hours(full_flops, tokens, g, n, mfu, "full") * n * g.price_per_hour
            for n, g in full_options
        ),
        default=None,
    )
    run_cost = chosen["cost_usd"]
    serve_gpu = max(table.gpus.values(), key=lambda g: (g.memory_gb, -g.price_per_hour))
    serve_gpu = min(
        (g for g in table.gpus.values() if g.memory_gb * 2**30 >= full_bytes * 1.3),
        key=lambda g: g.price_per_hour,
        default=serve_gpu,
    )
    n_full = b.customisations * serving_gpus(full_bytes, serve_gpu)
    n_shared = serving_gpus(full_bytes + b.customisations * adapter_bytes, serve_gpu)
    serve_full = n_full * serve_gpu.price_per_hour * hours_total
    serve_shared = n_shared * serve_gpu.price_per_hour * hours_total
    storage_full = b.customisations * full_bytes / 1e9 * table.storage_per_gb_month * b.months
    storage_adapters = (
        (full_bytes + b.customisations * adapter_bytes) / 1e9 * table.storage_per_gb_month * b.months
    )
    runs = b.customisations * b.runs_per_customisation
    baseline = b.baseline_cost
    if baseline is None:
        baseline = serve_full + storage_full + runs * (full_run or 0)
    new = b.new_cost
    if new is None:
        new = serve_shared + storage_adapters + runs * run_cost
    roi = (baseline - new - b.implementation_cost) / b.implementation_cost
    return {
        "training_gpu": f"{chosen['gpus_needed']} x {gpu.name}",
        "training_cost_per_run_usd": run_cost,
        "full_finetune_cost_per_run_usd": full_run,
        "adapter_size_mb": adapter_bytes / 1e6,
        "full_copy_size_gb": full_bytes / 1e9,
        "serving_gpu": serve_gpu.name,
        "serving_n_full_models": {"gpus": n_full, "cost_usd": serve_full},
        "serving_base_plus_n_adapters": {"gpus": n_shared, "cost_usd": serve_shared},
        "storage_n_full_copies_usd": storage_full,
        "storage_base_plus_n_adapters_usd": storage_adapters,
        "roi": {
            "formula": "ROI = (baseline cost - new cost - implementation cost) / implementation cost",
            "baseline_cost_usd": baseline,
            "baseline_is": "given"
            if b.baseline_cost is not None
            else "N full fine-tuned models: serving + storage + training runs",
            "new_cost_usd": new,
            "new_is": "given"
            if b.new_cost is not None
            else "one base + N adapters: serving + storage + LoRA training runs",
            "implementation_cost_usd": b.implementation_cost,
            "roi": roi,
        },
        "inputs": b.__dict__,
    }
