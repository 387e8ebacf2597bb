"""One table of model/config cases shared by the LoRA, adapter-format and PEFT-interop tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from conftest import VOCAB, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_qwen2


@dataclass(frozen=True)
class Case:
    model: str  # key of BUILDERS
    config: dict = field(default_factory=dict)  # LoraConfig kwargs (PEFT's names: the same dict builds both)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}

CASES = {
    "llama-qv": Case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "llama-all-linear-rslora": Case("llama", {"r": 4, "lora_alpha": 16, "target_modules": "all-linear",
                                              "use_rslora": True}),
    "llama-patterns": Case("llama", {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6}, "alpha_pattern": {"o_proj": 3},
    }),
    "llama-embedding": Case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "llama-layer1-excl": Case("llama", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"],
                                        "layers_to_transform": [1], "exclude_modules": ["up_proj"]}),
    "qwen2-all-linear": Case("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    "qwen2-regex-bias-all": Case("qwen2", {"r": 3, "lora_alpha": 6, "bias": "all",
                                           "target_modules": r".*\.(k_proj|down_proj)"}),
    "gpt2-conv1d": Case("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]}),
    "gpt2-all-linear-bias": Case("gpt2", {"r": 2, "lora_alpha": 2, "target_modules": "all-linear",
                                          "bias": "lora_only"}),
    "bert-classifier": Case("bert", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                     "modules_to_save": ["classifier"]}),
    "bert-seq-cls-all-linear": Case("bert", {"r": 2, "lora_alpha": 4, "target_modules": "all-linear",
                                             "task_type": "SEQ_CLS", "use_rslora": True}),
}


def build(case: Case, seed: int = 0):
    return BUILDERS[case.model](seed=seed)


def make_input(seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


@torch.no_grad()
def randomise_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every trainable tensor (LoRA A/B, trained copies, biases) non-zero values, deterministically."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()
