"""What `--methods` may name: prompting baselines and training methods with their rank.

  zero-shot, few-shot          the base model asked directly, or with k solved training examples first
  full                         full fine-tune
  lora, lora-r16               LoRA (rank from the config, or 16)
  qlora, qlora-r16             LoRA on a 4-bit NF4 base (qlora-nf4-r16 is the same)
  qlora-int8, qlora-int8-r16   LoRA on an 8-bit base
  pissa, pissa-r16             LoRA initialised by PiSSA (init_lora_weights: pissa)
A rank other than the config's keeps the config's alpha / r, so the update's scale stays the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tailor.method_specs import method_spec

PROMPTING = ("zero-shot", "few-shot")
# names that are a method with settings: {name: (method, TrainConfig fields)}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"pissa": ("lora", {"init_lora_weights": "pissa"})}
_TRAINED = re.compile(r"^(?P<method>full|lora|qlora|qlora-nf4|qlora-int8|pissa)(?:-r(?P<rank>\d+))?$")
VALID_FORMS = "zero-shot, few-shot, full, lora[-rN], qlora[-rN], qlora-nf4[-rN], qlora-int8[-rN], pissa[-rN]"


@dataclass(frozen=True)
class CompareEntry:
    label: str  # as the user wrote it: the row name and the run's folder
    method: str | None  # a tailor.methods name, None for prompting
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the base
    shots: int = 0  # few-shot: examples in the prompt

    @property
    def trains(self) -> bool:
        return self.method is not None


def parse_entries(text: str | list[str], base: dict[str, Any], shots: int = 3,
                  method_overrides: dict[str, dict[str, Any]] | None = None) -> list[CompareEntry]:
    """`few-shot,lora-r16,qlora` -> entries; unknown names raise a ValueError listing the valid forms.
    `method_overrides` adds settings per training method (e.g. {"full": {"lr": 1e-4}})."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"--methods is empty; name one or more of: {VALID_FORMS}")
    entries, bad = [], []
    for name in names:
        if name in PROMPTING:
            entries.append(CompareEntry(name, None, {}, shots if name == "few-shot" else 0))
            continue
        match = _TRAINED.match(name)
        if not match:
            bad.append(name)
            continue
        method, settings = VARIANTS.get(match["method"], ({"qlora": "qlora-nf4"}.get(match["method"],
                                                                                   match["method"]), {}))
        overrides: dict[str, Any] = {"method": method, **settings, **(method_overrides or {}).get(method, {})}
        if method_spec(method).trains_all_weights and base.get("replay_loss") == "kl":
            overrides["replay_loss"] = "ce"  # no frozen base under a full fine-tune to diverge from
        if match["rank"]:
            if method == "full":
                bad.append(name)
                continue
            rank = int(match["rank"])
            ratio = float(base.get("lora_alpha", 32.0)) / int(base.get("rank", 16))
            overrides.update(rank=rank, lora_alpha=ratio * rank)
        entries.append(CompareEntry(name, method, overrides))
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, bad))}; valid: {VALID_FORMS}")
    if len({e.label for e in entries}) != len(entries):
        raise ValueError(f"--methods names a method twice: {', '.join(names)}")
    return entries


__all__ = ["PROMPTING", "VALID_FORMS", "CompareEntry", "parse_entries"]
