"""The training config's sections: each field once, with its type, default and doc line, in the section of
the component that uses it. A new field is one line (and its doc) in one section; its flat name is its
field name, which the YAML, the flags and `--set` use. Each section checks its own values (`problems`);
what ties two sections together is checked by TrainConfig."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tailor.method_specs import METHODS
from tailor.names import BASE_DTYPES, DEFAULT_MODEL, OBJECTIVES, PRECISIONS, PREFERENCE_LOSSES, STRATEGIES

SCHEDULES = ("cosine", "linear", "constant")
OVERFLOWS = ("truncate", "drop")
FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")
REPLAY_LOSSES = ("ce", "kl")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
# init_lora_weights values (PEFT's): the rule of tailor.lora.initialisation.init_problem, kept here too so
# that the config is checked without torch (tailor.lora imports nothing of tailor, and torch on import)
BASE_CHANGING_INITS = ("pissa", "olora")  # and pissa_niter_K


def init_lora_weights_value(value: bool | str) -> bool | str:
    """The LoraConfig value of a config's init_lora_weights: "true"/"false" as written on a command line are
    the booleans; other spellings stay as they are (checked by LoraSection)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def init_changes_base(value: bool | str) -> bool:
    """PiSSA or OLoRA: the init moves part of each base weight into the adapter."""
    value = init_lora_weights_value(value)
    return isinstance(value, str) and (value in BASE_CHANGING_INITS or _is_pissa_niter(value))


def _is_pissa_niter(value: str) -> bool:
    return value.startswith("pissa_niter_") and value.removeprefix("pissa_niter_").isdigit()


def lora_shape_problems(rank: int | None, lora_alpha: float | None,
                        spell: Callable[[str, object], str] = lambda name, value: f"{name}: {value!r}",
                        ) -> list[str]:
    """The one rule for an adapter's shape, shared by the config's LoraSection and the planner's own checks
    (tailor.plan.planner): the rank a positive integer, alpha > 0; None is not checked. `spell(name,
    value)` names the value as the caller's user wrote it: `rank: 0` in a config, `--rank 0:` on plan's
    command line. (tailor.lora's LoraConfig keeps its own guard of r and lora_alpha for callers of the
    lora API: tailor.lora imports nothing of tailor.)"""
    problems = []
    if rank is not None and rank < 1:
        problems.append(f"{spell('rank', rank)} must be a positive integer (the LoRA rank; 8, 16, 32 are "
                        "usual)")
    if lora_alpha is not None and lora_alpha <= 0:
        problems.append(f"{spell('lora_alpha', lora_alpha)} must be > 0 (commonly 2 x rank)")
    return problems


class _Checks:
    """Collects one section's problems, each as `field: value and what is wrong`."""

    def __init__(self, section: object) -> None:
        self.section, self.problems = section, []

    def choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self.section, name)
        if value not in choices:
            self.problems.append(f"{name}: {value!r} is not one of {', '.join(choices)}")

    def positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self.section, name)
            if value is not None and ((value < 0) if allow_zero else (value <= 0)):
                self.problems.append(f"{name}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")

    def share(self, name: str, closed: bool = False, hint: str = "") -> None:
        value = getattr(self.section, name)
        if not (0 <= value <= 1 if closed else 0 <= value < 1):
            self.problems.append(f"{name}: {value!r} must be in [0, 1{']' if closed else ')'}{hint}")


@dataclass(frozen=True)
class ModelSection:
    """What is trained: the method and the base model."""

    method: str = "lora"
    """lora: a low-rank adapter on a frozen base; full: every weight; qlora-nf4 / qlora-int8: LoRA on a
    4-bit / 8-bit quantized base."""
    model: str = DEFAULT_MODEL
    """Base model: a local HF directory, a name in the local HF cache, a .gguf file, or the default."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.choice("method", METHODS)
        return c.problems


@dataclass(frozen=True)
class DataSection:
    """The examples: where they come from, how they are read and cut, and what is replayed."""

    data: str | list[str | dict] | None = None
    """Training data: a JSONL/JSON, CSV or parquet file, a directory of them, a dataset saved with datasets'
    save_to_disk, or builtin:support; or a list of sources mixed by weight ([{path: a.parquet, weight:
    0.7}, {path: b.jsonl, weight: 0.3}], each with its own columns:, format:, split:)."""
    columns: dict[str, str] | None = None
    """The format's field names -> your file's column names, e.g. {prompt: question, completion: answer}
    (for every source without columns of its own)."""
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
    canaries: int = 0
    """Fake secrets (card numbers, emails, phone numbers) planted in a copy of the training data, each in an
    assistant answer seen about 48 times over the run, listed in the run's canaries.json: `tailor eval
    --safety` then measures how many the model leaks (docs/safety.md). For testing data leakage only: never
    ship an adapter trained with canaries (0: none)."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.choice("overflow", OVERFLOWS)
        c.choice("format", FORMATS)
        c.choice("replay_loss", REPLAY_LOSSES)
        if not self.data:
            c.problems.append("data: missing; give a JSONL file (--data FILE.jsonl) or builtin:support")
        else:
            from tailor.data.sources import parse_sources

            c.problems += parse_sources(self.data)[1]
        c.positive("max_seq_len")
        c.share("val_fraction")
        c.share("replay_ratio", hint=" (e.g. 0.2: one example in five is replayed)")
        if self.replay_prompts and not self.replay_ratio:
            c.problems.append("replay_prompts: given, and replay_ratio is 0, so nothing is replayed; set "
                              "replay_ratio (e.g. 0.4) or leave replay_prompts out")
        from tailor.data.canaries import MAX_CANARIES

        if not 0 <= self.canaries <= MAX_CANARIES:
            c.problems.append(f"canaries: {self.canaries} must be between 0 and {MAX_CANARIES} (e.g. 8)")
        if self.replay_loss == "kl" and not self.replay_ratio:
            c.problems.append("replay_loss: kl applies to replayed examples, and replay_ratio is 0; set "
                              "replay_ratio (e.g. 0.4) or leave replay_loss out")
        return c.problems


@dataclass(frozen=True)
class LoraSection:
    """The adapter's shape (ignored by method full)."""

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
    init_adapter: str | None = None
    """Start from this adapter (a directory) and train it on, instead of a new one; with objective dpo
    it is also the reference (SFT first, then DPO)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row of each adapted weight (PEFT's use_dora; slower steps)."""
    init_lora_weights: bool | str = True
    """Adapter initialisation (PEFT's values): true (A kaiming-uniform, B zero), gaussian, pissa (B A = the
    top-r singular part of W, taken out of W), pissa_niter_K (the same by a fast randomised SVD, K
    iterations), olora (from W's QR). PiSSA and OLoRA adapters are saved as a rank-2r LoRA on the original
    base."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.problems += lora_shape_problems(self.rank, self.lora_alpha)
        init = init_lora_weights_value(self.init_lora_weights)
        if not (isinstance(init, bool) or init == "gaussian" or init_changes_base(init)):
            c.problems.append(f"init_lora_weights: {self.init_lora_weights!r} is not one of true, false, "
                              "gaussian, pissa, pissa_niter_K (K iterations, e.g. pissa_niter_4), olora")
        c.share("lora_dropout")
        if not self.target_modules:
            c.problems.append("target_modules: empty; use all-linear, a regex, or a list of module names")
        return c.problems


@dataclass(frozen=True)
class OptimizationSection:
    """How long and how fast: steps, batches, AdamW and its schedule."""

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
    optimizer: str = "adamw"
    """adamw (torch); adamw-8bit: bitsandbytes AdamW8bit, moments stored in 8 bits (block-wise), about a
    quarter of adamw's state; paged-adamw-8bit: the same with the state in CUDA unified memory (on a CPU it
    runs as adamw-8bit)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (https://arxiv.org/abs/2402.12354): each adapter's B learns at this multiple of lr (A at lr),
    grouped as PEFT's create_loraplus_optimizer does; 16 is the paper's usual value (null: off)."""
    loraplus_lr_embedding: float = 1e-6
    """With LoRA+, the learning rate of embedding adapters (PEFT's loraplus_lr_embedding)."""

    objective: str = "sft"
    """What is learned: sft (the answers, cross-entropy), dpo or orpo (which of two answers is preferred:
    {prompt, chosen, rejected} data; `--method dpo` is LoRA with objective dpo)."""
    beta: float = 0.1
    """DPO's beta: how far the trained model may move from the reference (larger: less far)."""
    preference_loss: str = "sigmoid"
    """DPO's loss: sigmoid (the DPO paper's) or ipo."""
    orpo_lambda: float = 0.1
    """ORPO's weight of the odds-ratio term beside the chosen answer's cross-entropy."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.choice("schedule", SCHEDULES)
        c.choice("optimizer", OPTIMIZERS)
        c.positive("loraplus_lr_embedding")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            c.problems.append(f"loraplus_lr_ratio: {self.loraplus_lr_ratio!r} must be > 0 (B's learning rate "
                              "as a multiple of A's; 16 is usual), or null for plain LoRA")
        c.positive("batch_size", "grad_accum", "max_steps", "lr", "epochs")
        c.positive("weight_decay", "warmup_steps", "warmup_ratio", "min_lr_ratio", allow_zero=True)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            c.problems.append(f"max_grad_norm: {self.max_grad_norm!r} must be > 0 (or null for no clipping)")
        c.share("warmup_ratio")
        c.share("min_lr_ratio", closed=True)
        if any(not 0 <= b < 1 for b in self.adam_betas):
            c.problems.append(f"adam_betas: {list(self.adam_betas)!r} must both be in [0, 1)")
        c.choice("objective", OBJECTIVES)
        c.choice("preference_loss", PREFERENCE_LOSSES)
        c.positive("beta", "orpo_lambda")
        return c.problems


@dataclass(frozen=True)
class PrecisionSection:
    """Numbers and memory: the dtype rule, recomputation, loss chunks, shared prefixes."""

    precision: str = "auto"
    """auto: bf16 where the device computes it natively, else fp32 (tailor env says which); bf16: frozen base
    stored in bf16, compute in bf16 autocast, trainable weights fp32; fp32: all fp32."""
    base_dtype: str = "auto"
    """The dtype the frozen base's linear and embedding weights are stored in (LoRA; QLoRA's base is
    quantized and full fine-tuning trains every weight, so neither is affected). bf16 with precision fp32:
    stored bf16, upcast to fp32 per matmul (half the memory, measured as fast). auto: bf16 (tailor env and
    the run's config.yaml say why)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (about 30% slower)."""
    loss_chunk_size: int = 1024
    """Rows of the output head computed at once (bounds the fp32 logits memory)."""
    share_prefix: bool = True
    """Run the token prefix that all rows of a batch share (one system prompt) once per batch, not per row."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.choice("precision", PRECISIONS)
        c.choice("base_dtype", BASE_DTYPES)
        c.positive("loss_chunk_size")
        return c.problems


@dataclass(frozen=True)
class DistributedSection:
    """Where it computes: the device, CPU threads, and several processes (torchrun)."""

    device: str | None = None
    """cuda or cpu; default cuda when available."""
    num_threads: int | None = None
    """CPU threads for torch; default os.cpu_count()."""
    strategy: str = "ddp"
    """ddp: every process holds the whole model; fsdp: weights, gradients and optimizer state are split
    across the processes (FSDP2)."""
    timeout: float = 600.0
    """Seconds a process waits for the others at a collective before the job fails (several processes)."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.choice("strategy", STRATEGIES)
        c.positive("num_threads", "timeout")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            c.problems.append(f"device: {self.device!r} is not cpu or cuda")
        return c.problems


@dataclass(frozen=True)
class EvaluationSection:
    """What the run reports while it trains: validation loss, metrics lines, the bar."""

    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    eval_batches: int | None = None
    """Cap on validation batches per evaluation (null: the whole validation split)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str | list[str] | None = None
    """Experiment trackers that also get the config, metrics, evaluation and adapter: tensorboard, mlflow,
    wandb (a list, or names joined by commas; all; none)."""

    def problems(self) -> list[str]:
        from tailor.trackers import tracker_problems

        c = _Checks(self)
        c.positive("log_every", "eval_batches")
        c.positive("eval_every", allow_zero=True)
        return c.problems + tracker_problems(self.report_to)


@dataclass(frozen=True)
class CheckpointSection:
    """What the run writes and where: the run directory, checkpoints, the store."""

    out: str | None = None
    """Run directory; default runs/<name>."""
    name: str | None = None
    """Run name (default: <method>-<data stem>)."""
    register: str | None = None
    """Add the trained adapter to the adapter store as the next version of this name ($TAILOR_ADAPTERS)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    keep_best: bool = True
    """Save the adapter with the lowest validation loss to best/ and use it as the final adapter."""
    resume: bool = False
    """Continue from the latest checkpoint in the run directory."""

    def problems(self) -> list[str]:
        c = _Checks(self)
        c.positive("keep_checkpoints")
        c.positive("save_every", allow_zero=True)
        if self.register is not None:
            from tailor.adapters.store import StoreError, check_name

            try:
                check_name(self.register)
            except StoreError as error:
                c.problems.append(f"register: {error}")
        return c.problems


# attribute name on TrainConfig.sections -> section class, in the order config.yaml lists them
SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "lora": LoraSection, "optimization": OptimizationSection,
    "precision": PrecisionSection, "distributed": DistributedSection, "evaluation": EvaluationSection,
    "checkpoints": CheckpointSection,
}
