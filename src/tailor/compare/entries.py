"""What `--methods` may name: prompting baselines and training methods with their rank.

  zero-shot, few-shot          the base model asked directly, or with k solved training examples first
  full                         full fine-tune
  lora, lora-r16               LoRA (rank from the config, or 16)
  dora, dora-r16               DoRA: LoRA with a trained magnitude per output row (use_dora)
  qlora, qlora-r16             LoRA on a 4-bit NF4 base (qlora-nf4-r16 is the same)
  qlora-int8, qlora-int8-r16   LoRA on an 8-bit base
  dpo, dpo-r16, orpo-r16       LoRA trained on preference pairs alone (DPO, ORPO)
  lora-r16+dpo                 the lora-r16 entry's adapter (SFT, named earlier) trained on with DPO
  pissa, pissa-r16             LoRA initialised by PiSSA (init_lora_weights: pissa)
A rank other than the config's keeps the config's alpha / r, so the update's scale stays the same.
Preference entries train on the data's preference set: builtin:support -> builtin:support-prefs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tailor.method_specs import method_spec

PROMPTING = ("zero-shot", "few-shot")
_TRAINED = re.compile(r"^(?P<method>full|lora|dora|pissa|qlora|qlora-nf4|qlora-int8|dpo|orpo)"
                      r"(?:-r(?P<rank>\d+))?(?:\+(?P<then>dpo|orpo))?$")
VALID_FORMS = ("zero-shot, few-shot, full, lora[-rN], dora[-rN], pissa[-rN], qlora[-rN], qlora-nf4[-rN], "
               "qlora-int8[-rN], dpo[-rN], orpo[-rN], lora[-rN]+dpo")
ALIASES = {"qlora": "qlora-nf4", "dpo": "lora", "orpo": "lora"}  # the tailor.methods name they train
# names that are a method with settings of its own: {name: (tailor.methods name, TrainConfig fields)}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"dora": ("lora", {"use_dora": True}),
                                                   "pissa": ("lora", {"init_lora_weights": "pissa"})}
# the preference set of a built-in SFT set (what a preference entry of a comparison trains on)
PREFERENCE_SETS = {"builtin:support": "builtin:support-prefs"}
INIT_FROM = "init_adapter_from"  # an override the runner resolves: the entry whose adapter to start from


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
        method, settings = VARIANTS.get(match["method"], (ALIASES.get(match["method"], match["method"]), {}))
        overrides: dict[str, Any] = {"method": method, **settings, **(method_overrides or {}).get(method, {})}
        objective = match["then"] or (match["method"] if match["method"] in ("dpo", "orpo") else None)
        if objective is not None:
            if match["then"] and method_spec(method).trains_all_weights:
                bad.append(name)
                continue
            data = ":".join(str(base.get("data") or "").split(":")[:2])  # builtin:NAME without its split
            if data not in PREFERENCE_SETS:
                raise ValueError(f"{name}: a preference entry trains on the data's preference set, and only "
                                 f"{', '.join(PREFERENCE_SETS)} has one; train on your own pairs with "
                                 "tailor train --method dpo --data PAIRS.jsonl")
            overrides.update(objective=objective, data=PREFERENCE_SETS[data], replay_ratio=0.0,
                             **(method_overrides or {}).get(objective, {}))
            overrides["replay_loss"] = "ce"
            if match["then"]:
                overrides[INIT_FROM] = name.split("+")[0]
        base_moves = method_spec(method).trains_all_weights or settings.get("init_lora_weights") == "pissa"
        if base_moves and base.get("replay_loss") == "kl":
            # no frozen base to diverge from: a full fine-tune moves it, PiSSA leaves only its residual
            overrides["replay_loss"] = "ce"
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
    labels = [e.label for e in entries]
    for entry in entries:
        start = entry.overrides.get(INIT_FROM)
        if start is not None and (start not in labels or labels.index(start) > labels.index(entry.label)):
            raise ValueError(f"{entry.label} trains on the adapter of {start}: name {start} before it in "
                             "--methods")
    if len({e.label for e in entries}) != len(entries):
        raise ValueError(f"--methods names a method twice: {', '.join(names)}")
    return entries


__all__ = ["INIT_FROM", "PREFERENCE_SETS", "PROMPTING", "VALID_FORMS", "CompareEntry", "parse_entries"]
