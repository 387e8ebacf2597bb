"""TrainConfig: every knob of a training run, grouped in sections (tailor.config.sections), read and
written under the flat names users have always had (`rank`, `lr`, `precision` in the YAML, --rank, --lr,
--precision on the command line, `config.rank` in code)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.config.sections import (
    SECTIONS,
    CheckpointSection,
    DataSection,
    DistributedSection,
    EvaluationSection,
    LoraSection,
    ModelSection,
    OptimizationSection,
    PrecisionSection,
    init_changes_base,
)
from tailor.method_specs import METHOD_SPECS

# method names that are LoRA with another objective (tailor.loss.preference): `--method dpo` is lora + dpo
PREFERENCE_METHODS = ("dpo", "orpo")


class ConfigError(ValueError):
    """A training configuration is invalid; the message lists every problem and how to fix it."""


@dataclass(frozen=True)
class Sections:
    """The eight sections of a run; each component is handed the one it uses (config.sections.lora ...)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    checkpoints: CheckpointSection = field(default_factory=CheckpointSection)


# flat name -> the section that holds it (a field name is unique across sections)
FIELD_SECTION: dict[str, str] = {f.name: section for section, cls in SECTIONS.items()
                                 for f in dataclasses.fields(cls)}


def field_names() -> list[str]:
    """Every flat name, section by section: the YAML's keys, the flags, config.yaml's order."""
    return list(FIELD_SECTION)


def field_types() -> dict[str, Any]:
    """Flat name -> its type (the flags' types; coerce_field and the type check read it too)."""
    hints: dict[str, Any] = {}
    for cls in SECTIONS.values():
        hints.update(typing.get_type_hints(cls))
    return hints


class TrainConfig:
    """A run's settings: built from flat names (`TrainConfig(rank=8, lr=1e-4)`) or sections, read by flat
    name (`config.rank`) or by section (`config.sections.lora`). Immutable: `replace` makes a changed copy.
    `lr` left out is the method's default learning rate, fixed when the config is made, so config.yaml
    records the value the run used. Checked once: `validate` (load_config calls it) passes a config once,
    and the same object, immutable, is not checked again (train() asks too, for configs built directly)."""

    __slots__ = ("sections", "_valid")
    sections: Sections

    def __init__(self, sections: Sections | None = None, **values: Any) -> None:
        unknown = [k for k in values if k not in FIELD_SECTION]
        if unknown:
            raise TypeError(f"TrainConfig got unknown field(s) {', '.join(unknown)}")
        if values.get("method") in PREFERENCE_METHODS:  # `--method dpo`: LoRA trained on preferences
            values = {**values, "objective": values["method"], "method": "lora"}
        sections = sections or Sections()
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            grouped.setdefault(FIELD_SECTION[name], {})[name] = value
        changed = {name: dataclasses.replace(getattr(sections, name), **changes)
                   for name, changes in grouped.items()}
        sections = dataclasses.replace(sections, **changed)
        if sections.optimization.lr is None:
            method = sections.model.method
            spec = METHOD_SPECS.get(method) if isinstance(method, str) else None  # validate reports others
            if spec is not None:
                optimization = dataclasses.replace(sections.optimization, lr=spec.default_lr)
                sections = dataclasses.replace(sections, optimization=optimization)
        object.__setattr__(self, "sections", sections)
        object.__setattr__(self, "_valid", False)

    def __getattr__(self, name: str) -> Any:
        """A flat name reads its section's field (`config.rank` is `config.sections.lora.rank`); any other
        name is an AttributeError as usual."""
        section = FIELD_SECTION.get(name)
        if section is None:
            raise AttributeError(f"TrainConfig has no field {name!r}")
        return getattr(getattr(self.sections, section), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"TrainConfig is immutable; use config.replace({name}=...)")

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and copy: rebuild from the sections
        return (TrainConfig, (self.sections,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and other.sections == self.sections

    def __hash__(self) -> int:
        return hash(self.sections)

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def replace(self, **values: Any) -> TrainConfig:
        """A copy with the given flat fields changed."""
        return TrainConfig(self.sections, **values)

    def run_name(self) -> str:
        if self.name:
            return self.name
        first = self.data[0] if isinstance(self.data, list) and self.data else self.data
        first = first.get("path") if isinstance(first, dict) else first
        stem = Path(str(first or "data").replace("builtin:", "")).stem.replace(":", "-")
        return f"{self.method}-{stem}"

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name()

    def to_dict(self) -> dict[str, Any]:
        """Flat name -> value, section by section: what config.yaml holds."""
        values = {name: getattr(self, name) for name in FIELD_SECTION}
        values["adam_betas"] = list(self.adam_betas)
        return values

    def validate(self) -> TrainConfig:
        """Check every field, changing nothing; raise one ConfigError listing all problems. Returns self, so
        that `TrainConfig(...).validate()` reads as one step. A config that passed is not checked again."""
        if self._valid:
            return self
        problems = _type_problems(self)
        if problems:  # the range checks below assume the types are right
            raise ConfigError(format_problems(problems))
        for name in SECTIONS:
            problems += getattr(self.sections, name).problems()
        problems += self._across_sections()
        if problems:
            raise ConfigError(format_problems(problems))
        object.__setattr__(self, "_valid", True)
        return self

    def _across_sections(self) -> list[str]:
        """What one section's value forbids in another's."""
        p: list[str] = []
        spec = METHOD_SPECS.get(self.method)
        full = spec is not None and spec.trains_all_weights
        if self.strategy == "fsdp" and spec is not None and spec.quantized_bits:
            p.append(f"strategy: fsdp cannot shard the packed weights of {self.method}; use strategy ddp "
                     "(or method lora)")
        if self.replay_loss == "kl" and full:
            p.append(f"replay_loss: kl compares with the frozen base under the adapter, and method "
                     f"{self.method} has none; use replay_loss ce, or a LoRA method")
        if self.replay_loss == "kl" and self.strategy == "fsdp":
            p.append("replay_loss: kl runs the base model on the replayed rows of each process's own batch, "
                     "and fsdp needs every process to make the same passes; use strategy ddp or "
                     "replay_loss ce")
        if self.objective != "sft" and self.replay_ratio > 0:
            p.append(f"replay_ratio: replay mixes answers into supervised data, and objective "
                     f"{self.objective} learns from preference pairs; set replay_ratio 0 (or objective sft)")
        if self.canaries and self.objective != "sft":
            p.append(f"canaries: planted in supervised answers, and objective {self.objective} learns from "
                     "preference pairs; leave canaries out (or objective sft)")
        if self.init_adapter is not None and (full or spec is None):
            p.append(f"init_adapter: method {self.method} trains no adapter to start from; use a LoRA method")
        if self.use_dora and full:
            p.append(f"use_dora: DoRA is a variant of the LoRA adapter, and method {self.method} trains "
                     "every weight with no adapter; use method lora (or a qlora method), or leave use_dora "
                     "out")
        if init_changes_base(self.init_lora_weights) and self.use_dora:
            p.append(f"init_lora_weights: {self.init_lora_weights} is saved converted for the original base, "
                     "which a DoRA adapter's magnitude cannot follow (PEFT converts plain LoRA only); leave "
                     "use_dora out, or init_lora_weights true")
        if init_changes_base(self.init_lora_weights) and spec is not None and spec.quantized_bits:
            p.append(f"init_lora_weights: {self.init_lora_weights} changes the base weights, and "
                     f"{self.method} keeps them quantized; use method lora, or init_lora_weights true or "
                     "gaussian")
        if init_changes_base(self.init_lora_weights) and self.replay_loss == "kl" and not full:
            p.append(f"replay_loss: kl compares with the base under the adapter, and init_lora_weights "
                     f"{self.init_lora_weights} leaves only the residual of the base there; use replay_loss "
                     "ce, or init_lora_weights true")
        if self.loraplus_lr_ratio is not None and full:
            p.append(f"loraplus_lr_ratio: LoRA+ sets the learning rate of adapters' B, and method "
                     f"{self.method} has none; leave loraplus_lr_ratio out, or train a LoRA method")
        if self.optimizer != "adamw" and self.strategy == "fsdp":
            p.append(f"optimizer: {self.optimizer} keeps block-wise state per whole tensor, and fsdp shards "
                     "the tensors; use strategy ddp or optimizer adamw")
        if self.register is not None and full:
            p.append(f"register: method {self.method} delivers a whole model, not an adapter; the store "
                     "keeps adapters (train a LoRA method, or leave register out)")
        return p


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


def allowed_types(name: str) -> set[Any]:
    """The plain types field `name` may hold (int, float, str, list, tuple, NoneType ...)."""
    return _allowed(field_types()[name])


def _list_items(name: str) -> tuple[type, ...]:
    """The plain types a list-valued field's items may be (list[str] -> (str,), list[str | dict] -> both)."""
    for kind in typing.get_args(field_types()[name]):
        if typing.get_origin(kind) is list:
            return tuple(_allowed(typing.get_args(kind)[0]))
    return (str,)


def _type_problems(config: TrainConfig) -> list[str]:
    problems = []
    for name in FIELD_SECTION:
        value = getattr(config, name)
        allowed = allowed_types(name)
        ok = any(
            (t is type(None) and value is None)
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, float) and math.isfinite(value))
            or (t is str and isinstance(value, str))
            or (t is list and isinstance(value, list)
                and all(isinstance(v, _list_items(name)) for v in value))
            or (t is dict and isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in value.items()))
            or (t is tuple and isinstance(value, tuple) and len(value) == 2)
            for t in allowed
        )
        if not ok:
            names = sorted("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            problems.append(f"{name}: {value!r} is not a {' or '.join(names)}")
    return problems


def format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid training config: {problems[0]}"
    return "invalid training config:\n" + "\n".join(f"  - {p}" for p in problems)


__all__ = ["ConfigError", "FIELD_SECTION", "Sections", "TrainConfig", "allowed_types", "field_names",
           "field_types", "format_problems"]
