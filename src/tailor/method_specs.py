"""The one registry of training methods: the names that the config, train, plan, advise and the command
line share, and what each needs known without loading torch. Plain data, no torch and nothing of tailor's,
so the config (which chooses a method by name) and the planner read it from below; the method objects,
which prepare models and save deliverables, live in tailor.methods and are imported only by its
`get_method`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of tailor needs to know about a training method without loading torch."""

    name: str
    summary: str
    trains_all_weights: bool  # full fine-tuning: every weight is trainable
    quantized_bits: int | None  # bits per frozen block-linear weight (None: not quantized)
    default_lr: float  # AdamW peak learning rate when the config gives none
    deliverable: str  # the run directory's subfolder holding the result: adapter/ or model/
    implementation: str  # "module:Class" of the TrainingMethod, imported only when used (torch, bnb)


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", "low-rank adapter on a frozen base (fp32 adapter)", False, None, 2e-4,
                   "adapter", "tailor.methods.lora:LoraMethod"),
        MethodSpec("full", "every weight trainable (fp32 master weights)", True, None, 2e-5,
                   "model", "tailor.methods.full:FullMethod"),
        MethodSpec("qlora-nf4", "low-rank adapter on a 4-bit NF4 frozen base (bitsandbytes)", False, 4, 2e-4,
                   "adapter", "tailor.methods.qlora:QLoraMethod"),
        MethodSpec("qlora-int8", "low-rank adapter on an 8-bit frozen base (bitsandbytes)", False, 8, 2e-4,
                   "adapter", "tailor.methods.qlora:QLoraMethod"),
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


__all__ = ["ADAPTER_METHODS", "METHODS", "METHOD_SPECS", "MethodSpec", "method_spec"]
