"""TrainConfig: every knob of a training run, from YAML and/or command-line flags, validated once."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tailor.files import atomic_write_text

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # == tailor.models.DEFAULT_MODEL (kept here: no import cycle)

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")  # == tailor.hardware.PRECISION_CHOICES (no torch here)
OVERFLOWS = ("truncate", "drop")
FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")
STRATEGIES = ("ddp", "fsdp")
REPLAY_LOSSES = ("ce", "kl")


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of tailor needs to know about a training method without loading torch (the method
    objects themselves: tailor.methods.get_method)."""

    name: str
    summary: str
    trains_all_weights: bool  # full fine-tuning: every weight is trainable
    quantized_bits: int | None  # bits per frozen block-linear weight (None: not quantized)
    default_lr: float  # AdamW peak learning rate when the config gives none
    deliverable: str  # the run directory's subfolder holding the result: adapter/ or model/


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", "low-rank adapter on a frozen base (fp32 adapter)", False, None, 2e-4,
                   "adapter"),
        MethodSpec("full", "every weight trainable (fp32 master weights)", True, None, 2e-5,
                   "model"),
        MethodSpec("qlora-nf4", "low-rank adapter on a 4-bit NF4 frozen base (bitsandbytes)", False, 4, 2e-4,
                   "adapter"),
        MethodSpec("qlora-int8", "low-rank adapter on an 8-bit frozen base (bitsandbytes)", False, 8, 2e-4,
                   "adapter"),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
ADAPTER_METHODS: tuple[str, ...] = tuple(n for n, s in METHOD_SPECS.items() if not s.trains_all_weights)


def method_spec(name: str) -> MethodSpec:
    """The spec of method `name`; a ValueError listing the valid names otherwise."""
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


class ConfigError(ValueError):
    """A training configuration is invalid; the message lists every problem and how to fix it."""


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------------
    method: str = "lora"
    """lora: a low-rank adapter on a frozen base; full: every weight; qlora-nf4 / qlora-int8: LoRA on a
    4-bit / 8-bit quantized base."""
    model: str = DEFAULT_MODEL_NAME
    """Base model: a local HF directory, a name in the local HF cache, a .gguf file, or the default."""
    # --- data ------------------------------------------------------------------------------------------
    data: str | None = None
    """Training data: a JSONL/JSON file, or builtin:support for the built-in support-ticket dataset."""
    val_data: str | None = None
    """Validation file; when absent, val_fraction of `data` is held out (builtin: its validation split)."""
    val_fraction: float = 0.1
    """Share of `data` held out for validation when no val_data is given (0 disables validation)."""
    format: str = "auto"
    """Data format: auto|alpaca|chat|prompt_completion|text."""
    max_seq_len: int = 512
    """Longest tokenized example; longer ones follow `overflow`."""
    overflow: str = "truncate"
    """What to do with examples longer than max_seq_len: truncate|drop."""
    group_by_length: bool = True
    """Put examples of similar length in the same batch (less padding, same data each epoch)."""
    replay_ratio: float = 0.0
    """Share of training examples that replay the base model's own answers to general prompts, so it keeps
    answering them as before (self-distillation; answers generated once and cached; 0: off)."""
    replay_prompts: str | None = None
    """Text file of general prompts to replay, one per line (blank lines and lines opening with # skipped);
    default: the built-in ones (tailor.train.replay.REPLAY_PROMPTS)."""
    replay_loss: str = "ce"
    """How replayed answers are learned: ce (cross-entropy on the base model's answer tokens) or kl (the
    KL divergence from the base model's whole next-token distribution at each answer token, computed with
    the adapter switched off; LoRA methods only)."""
    # --- where -----------------------------------------------------------------------------------------
    out: str | None = None
    """Run directory; default runs/<name>."""
    name: str | None = None
    """Run name (default: <method>-<data stem>)."""
    register: str | None = None
    """Add the trained adapter to the adapter store as the next version of this name ($TAILOR_ADAPTERS)."""
    device: str | None = None
    """cuda or cpu; default cuda when available."""
    num_threads: int | None = None
    """CPU threads for torch; default os.cpu_count()."""
    # --- optimisation ----------------------------------------------------------------------------------
    seed: int = 0
    """Seed for initialisation, data order, split and dropout."""
    max_steps: int | None = None
    """Optimizer steps to take; when absent, `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is absent (may be fractional)."""
    batch_size: int = 8
    """Examples per micro-batch in each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum * processes)."""
    lr: float | None = None
    """Peak learning rate of AdamW (default: the method's, 2e-4 for LoRA and QLoRA, 2e-5 for full)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to matrices only, never to norms or biases)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of all steps, used when warmup_steps is 0."""
    schedule: str = "cosine"
    """Learning-rate decay after warmup: cosine|linear|constant."""
    min_lr_ratio: float = 0.0
    """Floor of the decayed learning rate, as a share of lr."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    # --- LoRA ------------------------------------------------------------------------------------------
    rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (0 skips the work entirely)."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get an adapter: all-linear, a regex, or a list of module-name suffixes."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    # --- speed / memory --------------------------------------------------------------------------------
    precision: str = "auto"
    """auto: bf16 where the device computes it natively, else fp32 (tailor env says which); bf16: frozen base
    stored in bf16, compute in bf16 autocast, trainable weights fp32; fp32: all fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (about 30% slower)."""
    loss_chunk_size: int = 1024
    """Rows of the output head computed at once (bounds the fp32 logits memory)."""
    share_prefix: bool = True
    """Run the token prefix that all rows of a batch share (one system prompt) once per batch, not per row."""
    # --- several processes (torchrun; `tailor train --nproc N`) ------------------------------------------
    strategy: str = "ddp"
    """ddp: every process holds the whole model; fsdp: weights, gradients and optimizer state are split
    across the processes (FSDP2)."""
    timeout: float = 600.0
    """Seconds a process waits for the others at a collective before the job fails (several processes)."""
    # --- evaluation / checkpoints ----------------------------------------------------------------------
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    eval_batches: int | None = None
    """Cap on validation batches per evaluation (null: the whole validation split)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    keep_best: bool = True
    """Save the adapter with the lowest validation loss to best/ and use it as the final adapter."""
    resume: bool = False
    """Continue from the latest checkpoint in the run directory."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    progress: bool = True
    """Show a progress bar."""

    # ------------------------------------------------------------------------------------------------
    def run_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(str(self.data or "data").replace("builtin:", "")).stem.replace(":", "-")
        return f"{self.method}-{stem}"

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["adam_betas"] = list(self.adam_betas)
        return values

    def validate(self) -> TrainConfig:
        """Check every field; raise one ConfigError listing all problems."""
        problems = _type_problems(self)
        if problems:  # the range checks below assume the types are right
            raise ConfigError(_format_problems(problems))
        p = problems
        if self.lr is None and self.method in METHODS:
            self.lr = method_spec(self.method).default_lr  # resolved once: config.yaml records the value

        def choice(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                p.append(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if (value < 0) if allow_zero else (value <= 0):
                p.append(f"{name}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")

        choice("method", METHODS)
        choice("schedule", SCHEDULES)
        choice("precision", PRECISIONS)
        choice("overflow", OVERFLOWS)
        choice("format", FORMATS)
        choice("strategy", STRATEGIES)
        if self.strategy == "fsdp" and self.method in METHODS and method_spec(self.method).quantized_bits:
            p.append(f"strategy: fsdp cannot shard the packed weights of {self.method}; use strategy ddp "
                     "(or method lora)")
        if not self.data:
            p.append("data: missing; give a JSONL file (--data FILE.jsonl) or builtin:support")
        for name in ("max_seq_len", "batch_size", "grad_accum", "rank", "max_steps", "loss_chunk_size",
                     "keep_checkpoints", "log_every", "num_threads", "eval_batches"):
            positive(name)
        for name in ("lr", "epochs", "lora_alpha", "timeout"):
            positive(name)
        for name in ("weight_decay", "warmup_steps", "warmup_ratio", "eval_every", "save_every",
                     "min_lr_ratio"):
            positive(name, allow_zero=True)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"max_grad_norm: {self.max_grad_norm!r} must be > 0 (or null for no clipping)")
        if not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction: {self.val_fraction!r} must be in [0, 1)")
        if not 0 <= self.replay_ratio < 1:
            p.append(f"replay_ratio: {self.replay_ratio!r} must be in [0, 1) (e.g. 0.2: one example in five "
                     "is replayed)")
        choice("replay_loss", REPLAY_LOSSES)
        full = self.method in METHODS and method_spec(self.method).trains_all_weights
        if self.replay_loss == "kl" and full:
            p.append(f"replay_loss: kl compares with the frozen base under the adapter, and method "
                     f"{self.method} has none; use replay_loss ce, or a LoRA method")
        if self.replay_loss == "kl" and self.strategy == "fsdp":
            p.append("replay_loss: kl runs the base model on the replayed rows of each process's own batch, "
                     "and fsdp needs every process to make the same passes; use strategy ddp or "
                     "replay_loss ce")
        if self.replay_prompts and not self.replay_ratio:
            p.append("replay_prompts: given, and replay_ratio is 0, so nothing is replayed; set replay_ratio "
                     "(e.g. 0.4) or leave replay_prompts out")
        if self.replay_loss == "kl" and not self.replay_ratio:
            p.append("replay_loss: kl applies to replayed examples, and replay_ratio is 0; set replay_ratio "
                     "(e.g. 0.4) or leave replay_loss out")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout: {self.lora_dropout!r} must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio: {self.warmup_ratio!r} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio: {self.min_lr_ratio!r} must be in [0, 1]")
        if any(not 0 <= b < 1 for b in self.adam_betas):
            p.append(f"adam_betas: {list(self.adam_betas)!r} must both be in [0, 1)")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            p.append(f"device: {self.device!r} is not cpu or cuda")
        if not self.target_modules:
            p.append("target_modules: empty; use all-linear, a regex, or a list of module names")
        if self.register is not None:
            from tailor.adapters.store import StoreError, check_name

            try:
                check_name(self.register)
            except StoreError as error:
                p.append(f"register: {error}")
            if self.method in METHODS and method_spec(self.method).trains_all_weights:
                p.append(f"register: method {self.method} delivers a whole model, not an adapter; the store "
                         "keeps adapters (train a LoRA method, or leave register out)")
        if problems:
            raise ConfigError(_format_problems(problems))
        return self


# ------------------------------------------------------------------------------------------------------
# Building a config from YAML + overrides
# ------------------------------------------------------------------------------------------------------


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_types() -> dict[str, Any]:
    """Field name -> its type (the flags' types; coerce_field reads it too)."""
    return typing.get_type_hints(TrainConfig)


def field_help() -> dict[str, str]:
    """Field name -> its one-line doc (the string literal under each field in the class body)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = following.value.value.strip()  # type: ignore[attr-defined]
    return docs


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig fields; unknown keys are refused with their line numbers."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        fix = "one `field: value` per line; quote values with ':', '#', '[' or '{'." + _data_hint(path)
        raise ConfigError(f"{where}: not valid YAML ({what}). Fix the syntax there: {fix}") from None
    if values is None:
        raise ConfigError(f"{path}: the config file is empty (no settings). Write TrainConfig fields in it "
                          "(e.g. `data: my.jsonl`, see examples/lora.yaml), or leave the config argument out "
                          "and use flags.")
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ConfigError(f"{path}: the config must be a mapping of field: value, not a {kind}. "
                          f"Write one `field: value` per line (see examples/lora.yaml).{_data_hint(path)}")
    if "model_type" in values or "architectures" in values:
        raise ConfigError(f"{path} is a model's config.json, not a training config. Pass the model's "
                          f"directory with --model {path.parent}, and a YAML of TrainConfig fields (or "
                          "none).")
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    valid = set(field_names())
    unknown = [k for k in values if k not in valid]
    if unknown:
        where = "; ".join(f"{path}:{lines.get(k, '?')}: unknown key {k!r}{_did_you_mean(k)}" for k in unknown)
        raise ConfigError(f"{where}\nvalid keys: {', '.join(field_names())}{_data_hint(path)}")
    return {k: (v if not isinstance(v, list) or k != "adam_betas" else tuple(v)) for k, v in values.items()}


def _read_config_text(path: Path) -> str:
    """The text of a config file, or a ConfigError that names the path, what is wrong and the fix."""
    fix = "Give the path of a YAML file of TrainConfig fields (e.g. examples/lora.yaml)."
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ConfigError(f"{path}: is a directory, not a config file{hint}. {fix}")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found. Check the spelling and the working directory. "
                          + fix)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                          f"Save it as UTF-8 YAML.{_data_hint(path)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc}). Check that you may "
                          f"read it (ls -l). {fix}") from None


def _data_hint(path: Path) -> str:
    """A pointer to --data when the file looks like training data passed where the config goes."""
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".txt", ".parquet"):
        return f" If {path.name} is training data, pass it with --data {path}."
    return ""


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """TrainConfig from an optional YAML file, then `overrides` (None values are ignored), validated."""
    values: dict[str, Any] = read_yaml_config(path) if path else {}
    unknown = [k for k in overrides if k not in field_names()]
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(field_names())}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: coerce_field(k, v) for k, v in values.items()}
    try:
        config = TrainConfig(**values)
    except TypeError as exc:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(str(exc)) from exc
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """["lr=1e-4", "target_modules=[q_proj, v_proj]"] -> {"lr": 1e-4, ...}; values are read as YAML."""
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set warmup_steps=10")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return values


def save_config(config: TrainConfig, path: Path, note: str | None = None) -> None:
    """Write the resolved config as YAML, atomically; `note` goes above it as a comment (why a value was
    resolved so)."""
    comment = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
    atomic_write_text(path, comment + yaml.safe_dump(config.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------------------


def coerce_field(name: str, value: Any) -> Any:
    """Accept what YAML 1.1 and shells hand us: `2e-4` arrives as a string, ints where floats go."""
    kind = _field_types()[name]
    allowed = _allowed(kind)
    if isinstance(value, str) and float in allowed and str not in allowed:
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, str) and int in allowed and str not in allowed:
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if name == "adam_betas" and isinstance(value, list):
        return tuple(value)
    return value


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _allowed(kind: Any) -> set[Any]:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        out: set[Any] = set()
        for arg in typing.get_args(kind):
            out |= _allowed(arg)
        return out
    if origin is not None:
        return {origin}
    return {kind}


def _type_problems(config: TrainConfig) -> list[str]:
    problems = []
    for name, kind in _field_types().items():
        value = getattr(config, name)
        allowed = _allowed(kind)
        ok = any(
            (t is type(None) and value is None)
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, float) and math.isfinite(value))
            or (t is str and isinstance(value, str))
            or (t is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
            or (t is tuple and isinstance(value, tuple) and len(value) == 2)
            for t in allowed
        )
        if not ok:
            names = sorted("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            problems.append(f"{name}: {value!r} is not a {' or '.join(names)}")
    return problems


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, field_names(), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid training config: {problems[0]}"
    return "invalid training config:\n" + "\n".join(f"  - {p}" for p in problems)


__all__ = ["ConfigError", "TrainConfig", "coerce_field", "field_help", "field_names", "load_config",
           "parse_assignments", "read_yaml_config", "save_config"]
