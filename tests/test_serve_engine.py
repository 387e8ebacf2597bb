"""tailor.serve.engine: continuous batching with per-row adapters gives each request what it gets alone."""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from conftest import chat_tokenizer, tiny_chat_llama

from tailor.adapters.format import load_adapter, save_adapter
from tailor.lora import LoraConfig, add_lora, disable_adapters, lora_layers
from tailor.serve import adapters as serve_adapters
from tailor.serve.adapters import AdapterManager, AdapterRef, AdapterRefusedError, UnknownAdapterError
from tailor.serve.engine import Engine, Request
from tailor.serve.sampling import SamplingParams, stop_token_ids

SYSTEM = ("<|im_start|>system\nTriage as JSON. What is the capital of France? hello world, thanks a lot!"
          "<|im_end|>\n")
USERS = ["Where is my order ORD-12345?", "I want a refund for my kettle.", "hello", "thanks a lot",
         "What is the capital", "kettle refund now", "ORD-1", "world"]
RANKS = {"alpha": 2, "beta": 8, "gamma": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = [SYSTEM + f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n" for u in USERS]
    texts.append("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # no system prompt
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def fresh_model(tokenizer, seed: int = 3):
    return tiny_chat_llama(len(tokenizer), seed=seed)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tokenizer):
    """Three saved adapters of different ranks for the tiny chat model, with clearly non-zero weights."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, rank) in enumerate(RANKS.items()):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        model = add_lora(fresh_model(tokenizer), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape,
                                                                 generator=generator) * 0.5)
        save_adapter(model, root / name)
    return root


def logits_alone(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The reference: the request's logits at each generated position from one plain forward."""
    with torch.no_grad():
        full = model(torch.tensor([prompt + output])).logits[0]  # (P + N, V)
    return full[len(prompt) - 1 : len(prompt) - 1 + len(output)]


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}

    def recording(requests, logits):
        for request, row in zip(requests, logits, strict=True):
            if not request.finished:
                seen.setdefault(request.id, []).append(row.clone())

    engine.logits_listeners.append(recording)
    return seen


def hf_greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    stops = stop_token_ids(model, tokenizer)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    return new[: next((k for k, t in enumerate(new) if t in stops), len(new))]


def test_one_greedy_request_equals_hf_generate(one_thread, tokenizer, prompts):
    model = fresh_model(tokenizer)
    engine = Engine(model, tokenizer, max_batch=4)
    for prompt in prompts[:3] + prompts[-1:]:
        request = engine.generate([prompt], SamplingParams(max_tokens=20))[0]
        assert request.output_ids == hf_greedy(model, tokenizer, prompt, 20)
        assert request.finish_reason in ("length", "stop")
        assert request.text == tokenizer.decode(request.output_ids, skip_special_tokens=True)


@pytest.mark.parametrize("max_batch,share_prefix", [(2, True), (3, True), (8, True), (3, False)])
def test_continuous_batching_gives_each_request_its_logits_alone(one_thread, tokenizer, prompts, max_batch,
                                                                 share_prefix):
    model = fresh_model(tokenizer)
    # off through the switch the benchmark's ablation uses, on through the constructor
    engine = Engine(model, tokenizer, max_batch=max_batch)
    engine.share_prefix = share_prefix
    seen = record_logits(engine)
    lengths = [3 + 4 * (i % 4) for i in range(len(prompts))]  # rows leave at different steps
    requests = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])
    for request, prompt in zip(requests, prompts, strict=True):
        expected = logits_alone(model, prompt, request.output_ids)
        torch.testing.assert_close(torch.stack(seen[request.id][: len(request.output_ids)]), expected,
                                   atol=1e-5, rtol=1e-5)
    assert (engine.stats["prefix_tokens_reused"] > 0) == share_prefix
    assert not engine.running and engine.col == 0


def test_mixed_adapters_and_base_in_one_batch_equal_each_alone(one_thread, tokenizer, prompts, adapter_root):
    model = fresh_model(tokenizer)
    manager = AdapterManager(model, adapter_root, max_loras=2, max_lora_rank=8)  # 3 adapters, 2 slots
    engine = Engine(model, tokenizer, adapters=manager, max_batch=4)
    seen = record_logits(engine)
    names = ["alpha", "beta", None, "gamma", "alpha", "gamma", "beta", None, "alpha"]
    requests = engine.generate(prompts, SamplingParams(max_tokens=6), adapters=names)

    reference = fresh_model(tokenizer)
    for name in RANKS:
        load_adapter(reference, adapter_root / name, name=name)
    from tailor.lora import set_active_adapters

    for request, prompt, name in zip(requests, prompts, names, strict=True):
        if name is None:
            with disable_adapters(reference):
                expected = logits_alone(reference, prompt, request.output_ids)
        else:
            set_active_adapters(reference, name)
            expected = logits_alone(reference, prompt, request.output_ids)
        torch.testing.assert_close(torch.stack(seen[request.id][: len(request.output_ids)]), expected,
                                   atol=1e-4, rtol=1e-4, msg=f"{request.id} ({name})")
    assert manager.stats["evictions"] >= 1 and manager.stats["hits"] >= 1
    assert all(p == 0 for p in manager.pins)  # every slot released


def test_seeded_sampling_is_reproducible_whatever_the_batch(one_thread, tokenizer, prompts):
    model = fresh_model(tokenizer)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = Engine(model, tokenizer, max_batch=1).generate([prompts[0]], params)[0]
    batched = Engine(model, tokenizer, max_batch=4).generate(prompts[:5], params)
    assert batched[0].output_ids == alone.output_ids
    reseeded = SamplingParams(max_tokens=8, temperature=1.0, seed=8)
    other = Engine(model, tokenizer).generate([prompts[0]], reseeded)
    assert other[0].output_ids != alone.output_ids
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=3.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)  # 0 is the prompt alone (echo), -1 nothing


def test_stop_strings_cut_the_text_and_streamed_deltas_add_up(one_thread, tokenizer, prompts):
    model = fresh_model(tokenizer)
    engine = Engine(model, tokenizer)
    free = engine.generate([prompts[0]], SamplingParams(max_tokens=20))[0]
    assert len(free.text) > 4
    stop = free.text[3:5]
    deltas: list[str] = []
    request = Request(prompts[0], SamplingParams(max_tokens=20, stop=(stop,)),
                      on_update=lambda r, delta: deltas.append(delta))
    engine.submit(request)
    while not request.finished:
        engine.step()
    assert request.finish_reason == "stop"
    assert request.text == free.text[: free.text.index(stop)]
    assert "".join(deltas) == request.text


def test_adapter_load_during_traffic_neither_stalls_nor_corrupts(one_thread, tokenizer, prompts, adapter_root,
                                                                 monkeypatch):
    model = fresh_model(tokenizer)
    manager = AdapterManager(model, adapter_root, max_loras=2, max_lora_rank=8)
    engine = Engine(model, tokenizer, adapters=manager, max_batch=4)
    seen = record_logits(engine)
    reading, release = threading.Event(), threading.Event()
    read = serve_adapters.read_for_slots

    def slow_read(directory, slots):  # a slow disk: the load lasts until the test lets it end
        reading.set()
        assert release.wait(60)
        return read(directory, slots)

    engine.generate([prompts[0]], SamplingParams(max_tokens=1), adapters=["alpha"])  # alpha resident
    monkeypatch.setattr(serve_adapters, "read_for_slots", slow_read)
    engine.start()
    try:
        running = engine.submit(Request(prompts[1], SamplingParams(max_tokens=200, ignore_eos=True),
                                        adapter="alpha"))
        while not running.output_ids:
            time.sleep(0.005)
        late = engine.submit(Request(prompts[2], SamplingParams(max_tokens=5), adapter="beta"))
        assert reading.wait(30)
        before = len(running.output_ids)
        deadline = time.monotonic() + 60
        while len(running.output_ids) < before + 3 and not running.finished and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(running.output_ids) >= before + 3  # decoding went on while the load was held
        assert not late.output_ids and not late.finished
        release.set()
        assert late.done.wait(30) and running.done.wait(60)
    finally:
        engine.stop()
    assert late.finish_reason in ("length", "stop") and running.finish_reason == "length"
    reference = fresh_model(tokenizer)
    load_adapter(reference, adapter_root / "alpha", name="alpha")
    load_adapter(reference, adapter_root / "beta", name="beta")
    from tailor.lora import set_active_adapters

    for request, prompt, name in ((running, prompts[1], "alpha"), (late, prompts[2], "beta")):
        set_active_adapters(reference, name)
        torch.testing.assert_close(torch.stack(seen[request.id][: len(request.output_ids)]),
                                   logits_alone(reference, prompt, request.output_ids), atol=1e-4, rtol=1e-4)


def test_each_request_resolves_its_adapter_once(one_thread, tokenizer, prompts, adapter_root):
    """A name is resolved once, at submit; the reference travels with the request. An adapter in host
    memory is not read again, nor queued for a background read."""
    model = fresh_model(tokenizer)
    manager = AdapterManager(model, adapter_root, max_loras=2, max_lora_rank=8)
    engine = Engine(model, tokenizer, adapters=manager)
    params = SamplingParams(max_tokens=2)
    engine.generate(prompts[:3], params, adapters=["alpha", "beta", None])
    assert (manager.stats["resolves"], manager.stats["loads"]) == (2, 2)
    requests = engine.generate(prompts[:4], params, adapters=["alpha", "alpha", "beta", None])
    assert (manager.stats["resolves"], manager.stats["loads"]) == (5, 2)
    first, second, third, base = requests
    assert first.adapter == second.adapter == AdapterRef("alpha", (adapter_root / "alpha").resolve(), 0)
    assert third.adapter.name == "beta" and base.adapter is None
    manager.register("alpha")  # reloaded: a new generation, read again at its next request
    engine.generate(prompts[:1], params, adapters=["alpha"])
    assert (manager.stats["resolves"], manager.stats["loads"]) == (6, 3)


def test_adapter_names_never_escape_the_root(tmp_path, tokenizer, adapter_root):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(adapter_root / "alpha", root / "linked-out")  # a symlink leaving the root
    os.symlink(adapter_root, root / "all")
    manager = AdapterManager(fresh_model(tokenizer), root, max_loras=1, max_lora_rank=8)
    for bad in ("../root", "/etc", "a/b", "..", ".hidden", "all/alpha", ""):
        with pytest.raises(AdapterRefusedError):
            manager.path(bad)
    with pytest.raises(AdapterRefusedError, match="outside the adapter root"):
        manager.path("linked-out")
    with pytest.raises(UnknownAdapterError):
        manager.path("missing")
    with pytest.raises(AdapterRefusedError, match="outside the adapter root"):
        manager.register("x", adapter_root / "alpha")
    assert manager.names() == []

    (root / "beta").symlink_to(adapter_root / "beta")  # also outside once resolved
    copy_dir = root / "copy"
    copy_dir.mkdir()
    for f in (adapter_root / "beta").iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    assert manager.names() == ["copy"]
    with pytest.raises(AdapterRefusedError, match="above max_lora_rank=1"):
        AdapterManager(fresh_model(tokenizer), root, max_loras=1, max_lora_rank=1).read("copy")
    manager.unregister("copy")
    assert manager.names() == []
    with pytest.raises(UnknownAdapterError):
        manager.path("copy")
    manager.register("copy")
    assert manager.names() == ["copy"]


def test_engine_refuses_prompts_it_cannot_hold(tokenizer):
    engine = Engine(copy.deepcopy(fresh_model(tokenizer)), tokenizer, max_model_len=16)
    with pytest.raises(ValueError, match="at most 15"):
        engine.submit(Request(list(range(16))))
    with pytest.raises(UnknownAdapterError):
        engine.submit(Request([1, 2], adapter="alpha"))
    done = engine.generate([list(range(1, 14))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert done.finish_reason == "length" and len(done.output_ids) == 3  # the context is full


def test_store_references_follow_their_tag(one_thread, tokenizer, prompts, adapter_root, tmp_path,
                                           monkeypatch):
    from tailor.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    store.add("support", adapter_root / "alpha")  # support@1
    store.add("support", adapter_root / "beta")  # support@2
    store.tag("support@prod", 1)
    model = fresh_model(tokenizer)
    manager = AdapterManager(model, store.root, max_loras=2, max_lora_rank=8)
    engine = Engine(model, tokenizer, adapters=manager)
    assert {"support", "support@1", "support@2", "support@prod"} <= set(manager.names())
    params = SamplingParams(max_tokens=6)
    ask = {name: engine.generate([prompts[0]], params, adapters=[name])[0].output_ids
           for name in ("support@1", "support@2", "support@prod", "support")}
    assert ask["support@prod"] == ask["support@1"] != ask["support@2"] == ask["support"]
    store.tag("support@prod", 2)  # a tag move: the next request gets the new version
    assert engine.generate([prompts[0]], params, adapters=["support@prod"])[0].output_ids == ask["support@2"]

    # with a plain adapter root, NAME@TAG refers to the default store ($TAILOR_ADAPTERS)
    monkeypatch.setenv("TAILOR_ADAPTERS", str(store.root))
    plain = AdapterManager(fresh_model(tokenizer), adapter_root, max_loras=1, max_lora_rank=8)
    assert plain.path("support@1") == store.resolve("support@1")
    with pytest.raises(UnknownAdapterError):
        plain.path("support@9")


class _IdTokenizer:
    """Token ids in, ids out: enough tokenizer for the engine on models without a chat vocabulary."""

    pad_token_id, eos_token_id = 0, 127

    def get_vocab(self) -> dict:
        return {}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama-eager"])
def test_other_architectures_and_eager_attention(one_thread, arch):
    from conftest import tiny_gpt2, tiny_llama, tiny_qwen2

    model = {"gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "llama-eager": tiny_llama}[arch](seed=2)
    if arch.endswith("eager"):
        model.set_attn_implementation("eager")
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(1, 127, (20,), generator=generator).tolist()  # a shared prefix
    prompts = [shared + torch.randint(1, 127, (n,), generator=generator).tolist() for n in (3, 7, 12, 5)]
    engine = Engine(model, _IdTokenizer(), max_batch=3)
    seen = record_logits(engine)
    lengths = [SamplingParams(max_tokens=3 + 3 * i, ignore_eos=True) for i in range(4)]
    requests = engine.generate(prompts, lengths)
    for request, prompt in zip(requests, prompts, strict=True):
        torch.testing.assert_close(torch.stack(seen[request.id][: len(request.output_ids)]),
                                   logits_alone(model, prompt, request.output_ids), atol=1e-5, rtol=1e-5)
    assert engine.stats["prefix_tokens_reused"] > 0


def test_bf16_greedy_choice_is_the_fp32_scored_argmax(one_thread, tokenizer, prompts):
    """bf16 logits round near-ties to equal values; the engine re-scores the top candidates in fp32."""
    model = fresh_model(tokenizer).to(torch.bfloat16)
    engine = Engine(model, tokenizer, max_batch=4)
    assert engine.runner.split is not None
    chosen = []

    def check(requests, logits):
        exact = engine.runner.hidden.float() @ model.lm_head.weight.float().T  # (B, V): the fp32 head
        chosen.append((engine.runner.refine_greedy(logits), exact.argmax(dim=-1)))

    engine.logits_listeners.append(check)
    engine.generate(prompts[:4], SamplingParams(max_tokens=5))
    assert chosen
    for refined, exact in chosen:
        assert torch.equal(refined, exact)
    assert Engine(fresh_model(tokenizer), tokenizer).runner.split is None  # fp32: the logits are exact
