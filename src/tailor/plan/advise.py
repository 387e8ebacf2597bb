"""`tailor advise`: the field's escalation order as a decision aid, and a LoRA recipe that fits.

Order (cheapest and most reversible first): prompting -> few-shot examples -> tools -> retrieval ->
LoRA -> full fine-tuning. Each step is taken only when the one before cannot close the gap; the
reasons are printed with the answer. When LoRA is the answer we search a small grid (LoRA, then QLoRA;
batch 8 down to 1; gradient checkpointing on) with the planner and return the first recipe that fits the
user's GPU memory.

A recipe is a mapping of TrainConfig fields (tailor.config): `tailor advise --out recipe.yaml` writes it
and `tailor train recipe.yaml --data ...` runs it as is; `tailor plan recipe.yaml` plans that same run.
Each recipe is planned the way `tailor train` runs it on the recommended GPU (TrainConfig precision auto,
which is bf16 there: for LoRA a bf16 base with fp32 adapters, for full fine-tuning fp32 master weights with
bf16 compute; torch AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tailor.method_specs import ADAPTER_METHODS, method_spec
from tailor.names import DEFAULT_MODEL
from tailor.plan.catalogue import Architecture, PlanError, resolve_model
from tailor.plan.memory import estimate_memory
from tailor.plan.params import block_linears
from tailor.plan.planner import train_config_setup

STEPS = ("prompting", "few-shot", "tools", "retrieval", "lora", "full fine-tune")
MIN_EXAMPLES_LORA = 100  # below this, few-shot or collecting data beats training (LIMA used 1,000)
MIN_EXAMPLES_FULL = 100_000  # full fine-tuning pays off with very large data and a big shift


@dataclass
class AdviceInputs:
    """Answers to the decision questions; None means 'not answered' (asked when interactive)."""

    prompting_works: bool | None = None  # does a clear instruction alone meet the quality bar?
    few_shot_works: bool | None = None  # do a few examples in the prompt meet it?
    needs_actions: bool | None = None  # is the gap computing/looking up/acting (calculator, API, DB)?
    needs_knowledge: bool | None = None  # is the gap facts that live in documents or change over time?
    examples: int | None = None  # labelled input->output examples available
    large_shift: bool | None = None  # new language/domain far from the base model's training data?
    model: str = DEFAULT_MODEL  # what `tailor train` trains by default
    gpu_memory_gb: float = 24
    max_seq_len: int = 1024


QUESTIONS = {
    "prompting_works": "Does a clear instruction (zero-shot prompt) already meet your quality bar?",
    "few_shot_works": "Do a handful of examples in the prompt (few-shot) meet it?",
    "needs_actions": "Is the gap about computing, looking up live data or acting (calculator, API, DB)?",
    "needs_knowledge": "Is the gap about facts that live in your documents or change over time?",
    "large_shift": "Is your domain/language far from what the base model saw (e.g. a new language)?",
}


@dataclass
class Advice:
    answer: str  # one of STEPS
    reasons: list[str] = field(default_factory=list)
    recipe: dict | None = None  # TrainConfig fields (see recipe_yaml)
    assumed: list[str] = field(default_factory=list)  # unanswered questions and the default taken
    planned_peak_gib: float | None = None  # the planner's peak training memory for the recipe

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "escalation_order": list(STEPS),
            "reasons": self.reasons,
            "recipe": self.recipe,
            "planned_peak_gib": self.planned_peak_gib,
            "assumed": self.assumed,
        }


def advise(inputs: AdviceInputs) -> Advice:
    """Walk the escalation order; stop at the first step that closes the gap."""
    if (
        inputs.gpu_memory_gb <= 0
        or inputs.max_seq_len < 1
        or (inputs.examples is not None and inputs.examples < 0)
    ):
        raise PlanError(
            f"advise: gpu memory {inputs.gpu_memory_gb} GB, max_seq_len {inputs.max_seq_len}, "
            f"examples {inputs.examples}: all must be positive"
        )
    assumed = []

    def ask(name: str, default: bool) -> bool:
        value = getattr(inputs, name)
        if value is None:
            assumed.append(f"{QUESTIONS[name]} -> assumed {'yes' if default else 'no'}")
            return default
        return value

    reasons: list[str] = []
    if ask("prompting_works", False):
        return Advice(
            "prompting",
            [
                "a plain instruction already meets the bar: nothing to train, "
                "nothing to serve beyond the base model"
            ],
            assumed=assumed,
        )
    reasons.append("prompting alone does not meet the bar")
    if ask("few_shot_works", False):
        return Advice(
            "few-shot",
            [*reasons, "a few examples in the prompt close the gap; cost is only longer prompts"],
            assumed=assumed,
        )
    reasons.append("few-shot examples do not close the gap")
    if ask("needs_actions", False):
        return Advice(
            "tools",
            [
                *reasons,
                "the gap is computation/lookup/action: give the model tools "
                "(function calling) rather than teaching it to imitate results",
            ],
            assumed=assumed,
        )
    if ask("needs_knowledge", False):
        return Advice(
            "retrieval",
            [
                *reasons,
                "the gap is knowledge in documents or changing facts: retrieval "
                "keeps it current and citable; fine-tuning teaches behaviour, not facts "
                "reliably",
            ],
            assumed=assumed,
        )
    reasons.append("the gap is behaviour/format/style, which is what fine-tuning teaches")
    n = inputs.examples
    if n is None:
        assumed.append(f"examples not given -> assumed {MIN_EXAMPLES_LORA * 5}")
        n = MIN_EXAMPLES_LORA * 5
    if n < MIN_EXAMPLES_LORA:
        return Advice(
            "few-shot",
            [
                *reasons,
                f"only {n} examples: below ~{MIN_EXAMPLES_LORA}, training "
                "overfits; use them few-shot and collect more data first",
            ],
            assumed=assumed,
        )
    if n >= MIN_EXAMPLES_FULL and ask("large_shift", False):
        reasons.append(f"{n:,} examples and a large domain shift: full fine-tuning can use the capacity")
        recipe = _full_recipe(inputs)
        if recipe is not None:
            peak = recipe.pop("planned_peak_gib")
            return Advice("full fine-tune", [*reasons, *recipe.pop("reasons")], recipe, assumed, peak)
        reasons.append("but full fine-tuning does not fit the GPU memory given; LoRA instead")
    reasons.append(
        f"{n:,} examples are enough for a LoRA adapter (LoRA matches full fine-tuning on "
        "instruction/format tasks at a fraction of the memory; Hu et al. 2021, QLoRA paper)"
    )
    recipe = lora_recipe(inputs)
    if recipe is None:
        return Advice(
            "lora",
            [
                *reasons,
                f"no LoRA/QLoRA recipe fits {inputs.gpu_memory_gb:g} GB for "
                f"{inputs.model} at max_seq_len {inputs.max_seq_len}: choose a smaller model or a "
                "bigger GPU (see `tailor plan`)",
            ],
            None,
            assumed,
        )
    peak = recipe.pop("planned_peak_gib")
    return Advice("lora", [*reasons, *recipe.pop("reasons")], recipe, assumed, peak)


def planned_peak_gib(arch: Architecture, recipe: dict) -> float:
    """Planned peak training memory (GiB) of a recipe run as `tailor train` runs it: the figure
    `tailor plan RECIPE.yaml` prints (fields the recipe leaves out take TrainConfig's defaults)."""
    from tailor.config import TrainConfig

    return estimate_memory(arch, train_config_setup(TrainConfig(**recipe))).total / 2**30


def _recipe(inputs: AdviceInputs, method: str, batch: int, **adapter: object) -> dict:
    """TrainConfig fields of a starting recipe: the method's lr, 16 sequences per step, 2 epochs."""
    return {"model": inputs.model, "method": method, **adapter, "lr": method_spec(method).default_lr,
            "batch_size": batch, "grad_accum": max(1, 16 // batch), "max_seq_len": inputs.max_seq_len,
            "gradient_checkpointing": True, "precision": "auto", "epochs": 2.0}


def lora_recipe(inputs: AdviceInputs) -> dict | None:
    """First (method, batch) on the grid whose planned peak memory fits `gpu_memory_gb`: TrainConfig fields,
    plus `planned_peak_gib` and `reasons` (which `advise` takes out)."""
    arch = resolve_model(inputs.model)
    targets = "all-linear"
    n_targets = len(block_linears(arch))
    # LoRA on a bf16 base first, then on a quantised base, fewest bits first (QLoRA's NF4): more bits never
    # fit where fewer do not, so the grid is effectively LoRA, then QLoRA-NF4
    grid = sorted(ADAPTER_METHODS, key=lambda m: method_spec(m).quantized_bits or 0)
    for method in grid:
        spec = method_spec(method)
        for batch in (8, 4, 2, 1):
            recipe = _recipe(inputs, method, batch, rank=16, lora_alpha=32.0, target_modules=targets)
            peak = planned_peak_gib(arch, recipe)
            if peak <= inputs.gpu_memory_gb:
                quantised = f" (bf16 LoRA did not fit: the base is quantised to {spec.quantized_bits} bits)"
                reasons = [
                    f"{method}: planned peak {peak:.1f} GiB <= {inputs.gpu_memory_gb:g} GB"
                    + ("" if spec.quantized_bits is None else quantised),
                    f"rank 16, lora_alpha 32 on all {n_targets} kinds of block linear: all-linear "
                    "targeting matters more than rank (QLoRA paper, sec. 4); "
                    "lora_alpha = 2 x rank keeps the update scale steady",
                    f"lr {spec.default_lr:g}, the usual LoRA starting point (QLoRA paper: 2e-4 for 7B/13B); "
                    f"batch_size {batch} x grad_accum {recipe['grad_accum']} = effective 16 sequences",
                    "gradient checkpointing on: trades ~1/3 more compute for most activation memory",
                ]
                return {**recipe, "planned_peak_gib": peak, "reasons": reasons}
    return None


def _full_recipe(inputs: AdviceInputs) -> dict | None:
    """Full fine-tuning as `tailor train --method full` runs it: fp32 master weights with bf16 compute
    (TrainConfig precision auto on a GPU: bf16, the planner's bf16-mixed) and torch AdamW."""
    arch = resolve_model(inputs.model)
    for batch in (8, 4, 2, 1):
        recipe = _recipe(inputs, "full", batch)
        peak = planned_peak_gib(arch, recipe)
        if peak <= inputs.gpu_memory_gb:
            reasons = [
                f"full: planned peak {peak:.1f} GiB <= {inputs.gpu_memory_gb:g} GB "
                "(fp32 master weights and AdamW state, bf16 compute)",
                f"lr {recipe['lr']:g}: full fine-tuning moves every weight, a tenth of LoRA's rate or less; "
                f"batch_size {batch} x grad_accum {recipe['grad_accum']} = effective 16 sequences",
            ]
            return {**recipe, "planned_peak_gib": peak, "reasons": reasons}
    return None


def recipe_yaml(advice: Advice, inputs: AdviceInputs) -> str:
    """The recipe as a TrainConfig YAML that `tailor train FILE --data ...` runs as is."""
    import yaml

    from tailor.config import field_names

    if advice.recipe is None:
        raise PlanError(f"no recipe to write: the answer is {advice.answer}, which needs no training")
    unknown = [k for k in advice.recipe if k not in field_names()]
    if unknown:  # pragma: no cover - the recipes above use TrainConfig's names only
        raise PlanError(f"recipe keys {unknown} are not TrainConfig fields")
    peak = "" if advice.planned_peak_gib is None else f"planned peak {advice.planned_peak_gib:.1f} GiB, "
    header = (
        f"# tailor advise: {advice.answer} for {inputs.model} ({peak}{inputs.gpu_memory_gb:g} GB GPU)\n"
        "# train it: tailor train THIS_FILE --data YOUR_DATA.jsonl   plan it: tailor plan THIS_FILE\n"
    )
    return header + yaml.safe_dump(advice.recipe, sort_keys=False)
