"""Everything `tailor plan` takes, in one dataclass: each field is a flag (the command line generates them
from this class, as it does train's from the training config), and a field's default is plan's default.
Adding an input is one field here; `resolve_inputs` lays flags over a training config over the defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tailor.plan.catalogue import PlanError
from tailor.plan.planner import (
    BusinessInputs,
    StackOptions,
    plan,
    plan_base_dtype,
    plan_precision,
    train_config_inputs,
)

DEFAULT_TOKENS = 1e7
TOKENS_DEFAULT_BASIS = "default (--tokens 1e7); give --tokens, or max_steps in a config"
TOKENS_GIVEN_BASIS = "given with --tokens"

# older spellings still accepted on the command line
ALIASES: dict[str, tuple[str, ...]] = {"lora_alpha": ("--alpha",), "max_seq_len": ("--seq-len",),
                                       "grad_accum": ("--grad-accumulation",)}


@dataclass(frozen=True)
class PlanInputs:
    # --- the run (TrainConfig's names: a training config sets these) ---------------------------------
    model: str = "SmolLM2-135M"
    """catalogue name, config.json, .gguf, 7B"""
    method: str = "lora"
    """a training method (tailor.method_specs.METHODS)"""
    rank: int = 16
    """LoRA rank r"""
    lora_alpha: float = 32.0
    """LoRA alpha, scaling = lora_alpha / r"""
    target_modules: str = "all-linear"
    """all-linear | q_proj,v_proj"""
    batch_size: int = 1
    """sequences per micro-batch"""
    max_seq_len: int = 2048
    """tokens per sequence"""
    gradient_checkpointing: bool = True
    """recompute activations in backward"""
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32 | bf16-mixed (auto: what the run resolves it to on --device; a config's
    bf16 with method full is bf16-mixed: fp32 master weights, bf16 compute)"""
    device: str | None = None
    """cpu | cuda: where the run trains; memory is planned there (the process's RSS on a CPU) and precision
    auto resolved for it (default: this machine)"""
    attention: str | None = None
    """sdpa | eager: eager keeps each block's softmax (default: what tailor trains with on --device: eager on
    a CPU, sdpa on CUDA)"""
    adapter_dtype: str = "fp32"
    """LoRA weights+grads+state: fp32 | bf16"""
    base_dtype: str | None = None
    """bf16 | fp32: the frozen base's storage where precision is fp32 (a config's base_dtype; default: what
    the run stores, bf16 for LoRA at fp32)"""
    lora_dropout: float = 0.0
    """> 0 keeps a mask per adapted layer"""
    grad_accum: int = 1
    """micro-batches per step; > 1: gradients alive during forward"""
    loss_chunk_tokens: int | None = None
    """tokens per CE chunk (a config's loss_chunk_size; default: one unchunked loss)"""
    # --- the stack ------------------------------------------------------------------------------------
    optimizer: str = "adamw"
    """adamw | adamw-8bit | adamw-paged | adamw-8bit-paged | sgd"""
    optimizer_kernel: str = "fused"
    """AdamW kernel: fused | foreach | for-loop"""
    double_quant: bool = True
    """NF4 4.127 or 4.5 bits"""
    compile: bool = False
    """torch.compile'd cross-entropy"""
    loss_upcast: bool = True
    """fp32 log-softmax"""
    optimizer_in_backward: bool = False
    """step and free each gradient during backward"""
    activation_offloading: bool = False
    """kept activations in pinned CPU memory (torchtune)"""
    quant_keeps_inputs: bool = False
    """bitsandbytes < 0.43.2: 4-bit layers keep their inputs"""
    nproc: int = 1
    """training processes (tailor train --nproc / torchrun): adds the memory of each"""
    strategy: str = "ddp"
    """ddp (replicates) | fsdp (shards weights, gradients and optimizer state)"""
    # --- time and cost --------------------------------------------------------------------------------
    tokens: float | None = None
    """training tokens (all epochs) for time and cost (default: a config's max_steps x batch_size x
    grad_accum x max_seq_len, else 1e7)"""
    gpu: str | None = None
    """GPU from the price table to cost on"""
    mfu: float = 0.35
    """assumed model FLOPs utilisation (0-1)"""
    prices: str | None = None
    """YAML/JSON file overriding the GPU price table"""
    cost: bool = False
    """also print the business view (storage, serving, ROI)"""
    customisations: int = 10
    """--cost: N customisations to serve"""
    months: float = 12
    """--cost: horizon in months"""
    runs_per_customisation: int = 3
    """--cost: retrains each"""
    implementation_cost: float = 10_000
    """--cost: one-off USD"""
    baseline_cost: float | None = None
    """--cost: USD, else N full"""
    new_cost: float | None = None
    """--cost: USD; default base + N adapters"""

    def stack_options(self) -> StackOptions:
        """The memory-relevant choices of the training stack, as the planner takes them."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(StackOptions)}
        return StackOptions(**{name: value for name, value in given.items() if value is not None})

    def business(self) -> BusinessInputs | None:
        """The --cost view's inputs (None without --cost); PlanError when they cannot make a view."""
        if not self.cost:
            return None
        if self.implementation_cost <= 0 or self.customisations < 1:
            raise PlanError("--implementation-cost must be > 0 and --customisations >= 1")
        names = [f.name for f in dataclasses.fields(BusinessInputs) if hasattr(self, f.name)]
        return BusinessInputs(**{name: getattr(self, name) for name in names})


def _train_config(path: str) -> Any:
    """The TrainConfig a YAML describes, validated as `tailor train PATH` validates it (unknown keys are
    refused with their line; fields the file leaves out take TrainConfig's defaults, as in training)."""
    from tailor.config import load_config, read_yaml_config

    given = read_yaml_config(path)
    return load_config(path, data=None if given.get("data") else "builtin:support")  # plan needs no data


def this_machine_device() -> str:
    """cuda where torch sees a GPU, else cpu: what `tailor plan` plans when --device is left out."""
    from tailor.hardware import default_device  # imports torch: only when --device is left out

    return default_device()


def resolve_inputs(config: str | None, flags: dict[str, Any]) -> tuple[PlanInputs, str]:
    """Flags (None: not given) over a training config over plan's defaults -> (inputs, where the tokens
    come from). A config's run is planned as `tailor train` makes it (train_config_inputs)."""
    from tailor.method_specs import METHOD_SPECS

    flags = {k: v for k, v in flags.items() if v is not None}
    device = flags.setdefault("device", this_machine_device())
    train_config = _train_config(config) if config else None
    values = {**(train_config_inputs(train_config, device) if train_config else {}), **flags}
    values.setdefault("attention", "eager" if device == "cpu" else "sdpa")
    if values.get("precision", PlanInputs.precision) == "auto":
        values["precision"] = plan_precision("auto", values.get("method", PlanInputs.method), device)
    if train_config is not None and "method" in flags:  # a flag changed the config's method
        spec = METHOD_SPECS.get(values["method"])
        if "precision" not in flags:
            values["precision"] = plan_precision(train_config.precision, values["method"], device)
        if "lora_dropout" not in flags and spec is not None and spec.trains_all_weights:
            values["lora_dropout"] = 0.0  # train ignores lora_dropout when every weight trains
    # the frozen base's storage as the run resolves it (a config's value, else auto: bf16 for LoRA at fp32)
    values["base_dtype"] = plan_base_dtype(values.get("base_dtype") or "auto", values["precision"],
                                           values.get("method", PlanInputs.method))
    inputs = PlanInputs(**values)
    if inputs.tokens is not None:
        return inputs, TOKENS_GIVEN_BASIS
    max_steps = train_config.max_steps if train_config else None
    if max_steps:
        b, g, s = inputs.batch_size, inputs.grad_accum, inputs.max_seq_len
        basis = (f"upper bound from the config's max_steps: {max_steps} steps x batch_size {b} x grad_accum "
                 f"{g} x max_seq_len {s} (sequences shorter than max_seq_len make the run shorter)")
        return dataclasses.replace(inputs, tokens=float(max_steps * b * g * s)), basis
    return dataclasses.replace(inputs, tokens=DEFAULT_TOKENS), TOKENS_DEFAULT_BASIS


def plan_inputs(inputs: PlanInputs, tokens_basis: str | None = None) -> dict[str, Any]:
    """plan() of resolved inputs: the whole plan as a JSON-ready dict."""
    return plan(inputs.model, method=inputs.method, rank=inputs.rank, lora_alpha=inputs.lora_alpha,
                target_modules=inputs.target_modules, batch_size=inputs.batch_size,
                max_seq_len=inputs.max_seq_len, gradient_checkpointing=inputs.gradient_checkpointing,
                optimizer=inputs.optimizer, precision=inputs.precision,
                tokens=DEFAULT_TOKENS if inputs.tokens is None else inputs.tokens, gpu=inputs.gpu,
                mfu=inputs.mfu, prices=inputs.prices, business=inputs.business(),
                options=inputs.stack_options(), tokens_basis=tokens_basis, nproc=inputs.nproc,
                strategy=inputs.strategy, device=inputs.device or "cuda")


__all__ = ["ALIASES", "PlanInputs", "plan_inputs", "resolve_inputs", "this_machine_device"]
