"""Ready-made comparisons (`tailor compare --recipe NAME`)."""

from __future__ import annotations

from typing import Any

from tailor.train.demo import DEMO_RECIPE

# The demo preset on the built-in dataset: every method with 60 steps of 8 tickets (~tokens of 480
# examples), a budget at which the methods still differ (150 steps reach 0.99 field accuracy with LoRA),
# validation every 10 steps for the curves, 50 held-out tickets. Full fine-tuning takes its own
# learning rate (a whole model moves much further per step than an adapter).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "config": {**{k: v for k, v in DEMO_RECIPE.items() if k != "name"}, "max_steps": 60, "eval_every": 10,
                   "save_every": 0},
        "methods": "zero-shot,few-shot,full,lora-r4,lora-r16,lora-r64,qlora-r16",
        "method_overrides": {"full": {"lr": 1e-4}},
        "eval_data": "builtin:support:test",
        "eval_n": 50,
    },
    # Methods x tasks: the demo's recipe at 150 steps of 8 on each built-in task (support, code, analysis,
    # voice), prompting baselines against full fine-tuning, LoRA and QLoRA, 100 held-out examples per task.
    "tasks": {
        "config": {**{k: v for k, v in DEMO_RECIPE.items() if k != "name"}, "max_steps": 150,
                   "save_every": 0},
        "methods": "zero-shot,few-shot,full,lora-r16,qlora-r16",
        "method_overrides": {"full": {"lr": 1e-4}},
        "tasks": ["support", "code", "analysis", "voice"],
        "eval_n": 100,
    },
    # The same within 30 minutes on 2 CPU cores: drops full fine-tuning, QLoRA and zero-shot (few-shot is
    # the prompting baseline), trains 40 steps of 8, scores 30 held-out examples per task.
    "tasks-quick": {
        "config": {**{k: v for k, v in DEMO_RECIPE.items() if k != "name"}, "max_steps": 40, "save_every": 0},
        "methods": "few-shot,lora-r16",
        "tasks": ["support", "code", "analysis", "voice"],
        "eval_n": 30,
    },
}


def preset(name: str) -> dict[str, Any]:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(PRESETS)}") from None
