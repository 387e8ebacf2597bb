"""tailor serve with a DoRA adapter: the answers equal PEFT's greedy generation with that adapter, alone
and in one batch beside a plain LoRA adapter and the bare base (a real server and the `openai` client)."""

from __future__ import annotations

import asyncio
import shutil
import warnings

import openai
import pytest
import torch
from conftest import serving, tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailor.adapters.format import save_adapter
from tailor.lora import LoraConfig, add_lora
from tailor.serve.sampling import stop_token_ids
from tailor.serve.server import build_server

peft = pytest.importorskip("peft")
PROMPTS = [f"<|im_start|>user\nWhere is my {word}?<|im_end|>\n<|im_start|>assistant\n"
           for word in ("order", "refund", "kettle")]
ADAPTERS = {"dora": {"r": 4, "lora_alpha": 8, "use_dora": True}, "plain": {"r": 2, "lora_alpha": 4}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("dora-serve")
    model_dir = tiny_model_dir(base / "model")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_lora(model, LoraConfig(target_modules="all-linear", **config))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # B random (B = 0 changes nothing), magnitudes off their start
            for key, p in model.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=generator)
                    p.copy_(p * (1 + 0.3 * noise) if "lora_magnitude_vector" in key else noise * 0.5)
        save_adapter(model, base / "adapters" / name)
    return model_dir, base / "adapters"


def peft_answer(model_dir, adapter_dir, prompt: str, max_tokens: int) -> str:
    """PEFT's greedy answer with the adapter (None: the bare base), cut at the model's stop tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = stop_token_ids(model, tokenizer)
    if adapter_dir is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_a_dora_adapter_serves_pefts_answers_alone_and_in_a_mixed_batch(files, one_thread):
    model_dir, root = files
    app = build_server(str(model_dir), str(root), max_loras=2, max_lora_rank=4, max_batch=4, dtype="float32",
                       max_tokens=32)
    names = ["dora", "plain", None, "dora"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        alone = client.completions.create(model="dora", prompt=PROMPTS[0], max_tokens=10, temperature=0)

        async def together():
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
                return await asyncio.gather(*[
                    c.completions.create(model=name or str(model_dir), prompt=prompt, max_tokens=10,
                                         temperature=0) for name, prompt in zip(names, prompts, strict=True)])

        mixed = asyncio.run(together())
    expected = peft_answer(model_dir, root / "dora", PROMPTS[0], 10)
    assert alone.choices[0].text == expected
    assert expected != peft_answer(model_dir, None, PROMPTS[0], 10)  # the adapter changes the answer
    for answer, name, prompt in zip(mixed, names, prompts, strict=True):
        reference = peft_answer(model_dir, None if name is None else root / name, prompt, 10)
        assert answer.choices[0].text == reference, name


def test_dora_adapters_the_slots_cannot_hold_are_refused(files, tmp_path):
    from safetensors.torch import load_file, save_file

    from tailor.lora import add_lora_slots
    from tailor.serve.adapters import AdapterRefusedError, read_for_slots

    model_dir, root = files
    slots = add_lora_slots(AutoModelForCausalLM.from_pretrained(model_dir), num_slots=1, max_rank=4)
    prepared, rank = read_for_slots(root / "dora", slots)
    assert rank == 4 and all(len(tensors) == 3 for tensors in prepared.values())  # A^T, g * s B^T, g - 1

    broken = tmp_path / "broken"  # a magnitude dropped from the file
    shutil.copytree(root / "dora", broken)
    weights = load_file(broken / "adapter_model.safetensors")
    dropped = next(k for k in sorted(weights) if k.endswith("lora_magnitude_vector"))
    del weights[dropped]
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterRefusedError, match="without lora_magnitude_vector"):
        read_for_slots(broken, slots)

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # DoRA on the embeddings: not a slot's
    add_lora(model, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    save_adapter(model, tmp_path / "embedding")
    with pytest.raises(AdapterRefusedError, match="lora_embedding_A"):
        read_for_slots(tmp_path / "embedding", slots)
