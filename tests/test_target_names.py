"""adapter_config.json's target_modules is written as PEFT writes it: short names (q_proj, ...) for
"all-linear", full paths only where a short name would also reach a layer that was not adapted. PEFT then
adapts exactly the same modules (compared as sets of module paths) with the same logits; adapters saved
with full paths still load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_llama
from lora_cases import logits, make_input, randomise_trainable

from tailor.adapters.format import load_adapter, save_adapter
from tailor.lora import LoraConfig, add_lora, lora_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _peft_paths(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {k.removeprefix("base_model.model.") for k, m in model.named_modules()
            if isinstance(m, LoraLayer) and not k.endswith("base_layer")}


class _Scaled(torch.nn.Module):
    """Not a linear layer, though named like one: all-linear leaves it alone."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x) * 0.5


def _odd_llama():
    """Layer 0's down_proj is not an nn.Linear: the short name "down_proj" would reach it too."""
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = _Scaled(model.model.layers[0].mlp.down_proj)
    return model


@pytest.mark.parametrize("build, extra, short", [
    (tiny_llama, {}, True),
    (tiny_llama, {"layers_to_transform": [1]}, True),  # the layer filter is written beside the short names
    (tiny_llama, {"exclude_modules": ["model.layers.0.self_attn.q_proj"]}, True),  # so is the exclusion
    (_odd_llama, {}, False),  # full paths: "down_proj" would also match the layer that was not adapted
], ids=["all-linear", "layer-1", "one-path-excluded", "same-name-not-linear"])
def test_all_linear_is_saved_as_peft_writes_it_and_peft_adapts_the_same_modules(build, extra, short,
                                                                                tmp_path):
    model = add_lora(build(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", **extra))
    randomise_trainable(model)
    save_adapter(model, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    ours = set(lora_layers(model))
    if short:
        assert written == SHORT
    else:
        assert written == sorted(ours) and len(written) == 14  # 13 block linears + the inner one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a")).eval()
    assert _peft_paths(reference) == ours
    ids = make_input()
    torch.testing.assert_close(logits(reference, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_an_adapter_saved_with_full_paths_still_loads(tmp_path):
    """What tailor wrote before: every module path of all-linear (14 for two layers)."""
    paths = [f"model.layers.{i}.{kind}.{name}" for i in range(2) for kind, names in
             (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
              ("mlp", ("gate_proj", "up_proj", "down_proj")))
             for name in names]
    model = add_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=paths))
    randomise_trainable(model)
    save_adapter(model, tmp_path / "a")
    assert len(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) == 14
    back = tiny_llama()
    load_adapter(back, tmp_path / "a")
    assert set(lora_layers(back)) == set(paths)
    ids = make_input()
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-6, rtol=1e-6)
