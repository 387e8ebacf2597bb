"""Log-probabilities, echo and the fields benchmark clients send, through the official `openai` client
against a real `tailor serve` app (uvicorn on loopback), each value checked against a hand computation on
the transformers model (with the same PEFT-format adapter)."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch
from conftest import serving, tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailor.adapters.format import load_adapter, save_adapter
from tailor.lora import LoraConfig, add_lora, disable_adapters, lora_layers, set_active_adapters
from tailor.serve.processors import process_logits
from tailor.serve.request import Request
from tailor.serve.sampling import SamplingParams
from tailor.serve.server import build_server

PROMPT = "<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n"
ADAPTERS = ("alpha", "beta")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("logprobs")
    model_dir = tiny_model_dir(base / "model")
    root = base / "adapters"
    for seed, name in enumerate(ADAPTERS):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
        save_adapter(model, root / name)
    return model_dir, root


@pytest.fixture(scope="module")
def server(files):
    model_dir, root = files
    torch.set_num_threads(1)
    app = build_server(str(model_dir), str(root), max_loras=2, max_lora_rank=8, max_batch=4, dtype="float32",
                       max_tokens=64, timeout=60)
    with serving(app) as url:
        yield {"url": url, "model": str(model_dir)}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def hand(files):
    """The transformers model with the adapters as named adapters: log_softmax of its logits by hand."""
    model_dir, root = files
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name in ADAPTERS:
        load_adapter(model, root / name, name=name)

    class Hand:
        def raw_logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
            """(V,): the logits after the last position."""
            return self.logits(ids, adapter)[-1]

        def logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
            with torch.no_grad():
                if adapter is None:
                    with disable_adapters(model):
                        return model(torch.tensor([ids])).logits[0].double()  # (len(ids), V)
                set_active_adapters(model, adapter)
                return model(torch.tensor([ids])).logits[0].double()

        def logprobs(self, ids: list[int], adapter: str | None) -> torch.Tensor:
            """(len(ids), V): log-probabilities of the next token after each position."""
            return torch.log_softmax(self.logits(ids, adapter), dim=-1)

        def greedy(self, ids: list[int], adapter: str | None, n: int) -> list[int]:
            out = list(ids)
            for _ in range(n):
                out.append(int(self.logprobs(out, adapter)[-1].argmax()))
            return out[len(ids):]

    hand = Hand()
    hand.tokenizer = tokenizer
    return hand


def test_completion_logprobs_of_each_adapter_in_one_batch(server, hand):
    """Concurrent requests to two adapters and the base: each row's log-probabilities are its own model's,
    and top_logprobs are its most likely tokens (the chosen one included)."""
    names = [*ADAPTERS, None]
    ids = hand.tokenizer(PROMPT)["input_ids"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
        async with client:
            return await asyncio.gather(*[
                client.completions.create(model=name or server["model"], prompt=PROMPT, max_tokens=6,
                                          temperature=0, logprobs=3, extra_body={"ignore_eos": True})
                for name in names])

    for name, response in zip(names, asyncio.run(main()), strict=True):
        logprobs = response.choices[0].logprobs
        generated = hand.greedy(ids, name, 6)
        assert logprobs.tokens == [hand.tokenizer.decode([t]) for t in generated]
        expected = hand.logprobs(ids + generated, name)[len(ids) - 1 : -1]  # (6, V)
        for k, token in enumerate(generated):
            assert logprobs.token_logprobs[k] == pytest.approx(float(expected[k, token]), abs=TOLERANCE)
            top = expected[k].topk(3)
            want = {hand.tokenizer.decode([int(t)]): float(v) for v, t in zip(*top, strict=True)}
            got = logprobs.top_logprobs[k]
            assert set(want) <= set(got) and len(got) <= 4, (name, k)
            for text, value in want.items():
                assert got[text] == pytest.approx(value, abs=TOLERANCE)
        lengths = [len(t) for t in logprobs.tokens]
        assert logprobs.text_offset == [sum(lengths[:k]) for k in range(len(lengths))]
        assert response.choices[0].text == "".join(logprobs.tokens)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_returns_the_prompt_logprobs_as_lm_eval_asks(client, server, hand, max_tokens):
    """lm-evaluation-harness's local-completions: token-id prompts in a batch, echo, logprobs 1,
    max_tokens 0 (older) or 1 (current), temperature 0, seed."""
    prompts = [hand.tokenizer(PROMPT)["input_ids"], hand.tokenizer("Paris is in France")["input_ids"]]
    response = client.completions.create(model="alpha", prompt=prompts, max_tokens=max_tokens, temperature=0,
                                         logprobs=1, echo=True, seed=1234)
    assert [c.index for c in response.choices] == [0, 1]
    for choice, ids in zip(response.choices, prompts, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + max_tokens
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        expected = hand.logprobs(ids, "alpha")
        for j in range(1, len(ids)):
            assert logprobs.token_logprobs[j] == pytest.approx(float(expected[j - 1, ids[j]]), abs=TOLERANCE)
            best = int(expected[j - 1].argmax())
            top = logprobs.top_logprobs[j]
            assert top[hand.tokenizer.decode([best])] == pytest.approx(float(expected[j - 1, best]),
                                                                        abs=TOLERANCE)
        assert choice.text.startswith(hand.tokenizer.decode(ids))
        assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 2 * max_tokens


def test_chat_logprobs_and_streamed_logprobs(client, server, hand):
    messages = [{"role": "user", "content": "Where is my order?"}]
    ids = hand.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    response = client.chat.completions.create(model="beta", messages=messages, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    generated = hand.greedy(ids, "beta", 5)
    expected = hand.logprobs(ids + generated, "beta")[len(ids) - 1 : -1]
    assert [c.token for c in content] == [hand.tokenizer.decode([t]) for t in generated]
    for k, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(expected[k, generated[k]]), abs=TOLERANCE)
        assert entry.bytes == list(entry.token.encode())
        values, tokens = expected[k].topk(2)
        assert [t.token for t in entry.top_logprobs] == [hand.tokenizer.decode([int(t)]) for t in tokens]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=TOLERANCE)

    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                      echo=True)
    pieces = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0,
                                            logprobs=2, echo=True, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    tokens = [t for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    offsets = [o for p in pieces if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert tokens == plain.choices[0].logprobs.tokens
    assert offsets == plain.choices[0].logprobs.text_offset


def test_ignore_eos_and_min_tokens_give_exactly_n_tokens(client, server, hand):
    """min_tokens masks the stop tokens: asking to stop at every token greedy decoding would choose still
    gives N tokens, none of them those."""
    ids = hand.tokenizer(PROMPT)["input_ids"]
    greedy = hand.greedy(ids, None, 8)
    for n in (1, 5, 12):
        response = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=n,
                                             temperature=0, logprobs=0,
                                             extra_body={"ignore_eos": True, "min_tokens": n,
                                                         "stop_token_ids": greedy[:1]})
        assert response.usage.completion_tokens == n
        assert len(response.choices[0].logprobs.tokens) == n
        assert response.choices[0].finish_reason == "length"
        assert hand.tokenizer.decode(greedy[:1]) not in response.choices[0].logprobs.tokens


def test_stop_token_ids_end_the_answer_without_their_text(client, server, hand):
    ids = hand.tokenizer(PROMPT)["input_ids"]
    greedy = hand.greedy(ids, "alpha", 8)
    stop_at = next(k for k in range(1, 8) if greedy[k] not in greedy[:k])
    response = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"stop_token_ids": [greedy[stop_at]]})
    assert response.choices[0].text == hand.tokenizer.decode(greedy[:stop_at])
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == stop_at + 1  # the stop token was generated


def test_top_k_1_is_greedy_at_any_temperature(client, server):
    greedy = client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    for seed in (1, 2, 3):
        sampled = client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=1.5,
                                            seed=seed, extra_body={"top_k": 1, "ignore_eos": True})
        assert sampled.choices[0].text == greedy
    wide = {client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=1.5, seed=seed,
                                      extra_body={"top_k": 0, "ignore_eos": True}).choices[0].text
            for seed in (1, 2, 3)}
    assert wide != {greedy}  # top_k 0 is off: sampling varies


def test_repetition_penalty_matches_a_hand_computation(client, server, hand):
    """vLLM's rule by hand: logits of tokens in the prompt or the answer so far divided by p when positive,
    multiplied by p otherwise; greedy takes the argmax."""
    ids = hand.tokenizer(PROMPT)["input_ids"]
    penalty = 1.8
    out: list[int] = []
    for _ in range(8):
        raw = hand.raw_logits(ids + out, "alpha")  # (V,) at the last position
        seen = sorted(set(ids + out))
        raw[seen] = torch.where(raw[seen] > 0, raw[seen] / penalty, raw[seen] * penalty)
        out.append(int(raw.argmax()))
    response = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"repetition_penalty": penalty, "ignore_eos": True})
    assert response.choices[0].text == hand.tokenizer.decode(out, skip_special_tokens=True)
    plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text != response.choices[0].text  # the penalty changed something here


def test_min_tokens_masks_eos_and_stop_token_ids_only_until_then():
    """The processor on hand-made logits: eos (7) and a stop id (9) are the two best tokens."""
    logits = torch.zeros(2, 12)
    logits[:, 7], logits[:, 9], logits[:, 3] = 5.0, 4.0, 1.0
    early = Request([1, 2], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(9,)))
    done = Request([1, 2], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(9,)))
    done.generated = 2
    out = process_logits(logits, [early, done], {7}, [0, 1])
    assert int(out[0].argmax()) == 3 and math.isinf(out[0, 7]) and math.isinf(out[0, 9])
    assert torch.equal(out[1], logits[1])
    ignoring = Request([1, 2], SamplingParams(max_tokens=4, min_tokens=2, ignore_eos=True))
    assert int(process_logits(logits, [ignoring], {7}, [0])[0].argmax()) == 7  # eos is no stop then


def test_bad_fields_are_400s_naming_them(client, server):
    base = server["model"]
    cases = [({"extra_body": {"min_p": 0.1}}, "Unrecognized request argument supplied: min_p"),
             ({"max_tokens": 0}, "echo"),
             ({"logprobs": 21}, "logprobs"),
             ({"extra_body": {"min_tokens": 5}, "max_tokens": 2}, "min_tokens"),
             ({"extra_body": {"top_k": -2}}, "top_k"),
             ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
             ({"extra_body": {"stop_token_ids": [10_000]}}, "stop_token_ids")]
    for fields, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=base, prompt="hi", **{"max_tokens": 2, **fields})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       top_logprobs=2)


def test_echo_rows_beside_prefix_sharing_rows_in_one_prefill(one_thread, files, hand):
    """Prompts that share a long prefix: the plain rows copy it from the prefix store, the echo row
    computes its whole prompt; its prompt log-probabilities and everyone's answers equal each alone."""
    from tailor.models import load_model
    from tailor.serve.engine import Engine

    model_dir, _ = files
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    system = "<|im_start|>system\nYou answer questions about orders, briefly.<|im_end|>\n"
    prompts = [tokenizer(system + PROMPT.replace("order", word))["input_ids"]
               for word in ("order", "parcel", "refund")]
    plain = SamplingParams(max_tokens=5, ignore_eos=True)
    echo = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    engine = Engine(model, tokenizer, max_batch=4)
    engine.generate(prompts[:2], plain)  # stores the shared prefix
    together = engine.generate(prompts, [plain, echo, plain])
    assert engine.stats["prefix_tokens_reused"] > 0
    for prompt, request in zip(prompts, together, strict=True):
        assert request.output_ids == hand.greedy(prompt, None, 5)
    echoed = together[1]
    expected = hand.logprobs(prompts[1] + echoed.output_ids, None)
    assert [e.token for e in echoed.prompt_logprobs] == prompts[1]
    assert echoed.prompt_logprobs[0].logprob is None
    got = [e.logprob for e in echoed.prompt_logprobs[1:]] + [e.logprob for e in echoed.logprobs]
    tokens = prompts[1][1:] + echoed.output_ids
    want = [float(expected[j, t]) for j, t in enumerate(tokens)]
    assert got == pytest.approx(want, abs=TOLERANCE)


def test_logprobs_benchmark_runs_end_to_end(one_thread, tmp_path):
    """benchmarks/serve_logprobs.py with a tiny model and setting (figures come from a quiet machine)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_logprobs.py"
    spec = importlib.util.spec_from_file_location("serve_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_logprobs"] = module
    spec.loader.exec_module(module)
    model_dir = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out.json"
    result = module.main(["--model", str(model_dir), "--dtype", "float32", "--requests", "3", "--new-tokens",
                          "4", "--rank", "4", "--json", str(out)])
    assert json.loads(out.read_text())["decode_ratio"] == result["decode_ratio"] > 0
    assert result["echo_ratio"] > 0 and set(result["prompts_per_s"]) == {"plain", "echo"}


def test_bf16_models_report_prompt_logprobs_from_their_split_head(one_thread, files, hand):
    """A bf16 model runs its body and head apart (tailor.serve.runner): the prompt's positions go through
    the head too; values near the fp32 model's (bf16 rounding)."""
    from tailor.models import load_model
    from tailor.serve.engine import Engine

    model_dir, _ = files
    model, tokenizer = load_model(str(model_dir), dtype=torch.bfloat16)
    engine = Engine(model, tokenizer, max_batch=2)
    assert engine.runner.split is not None
    prompt = tokenizer(PROMPT)["input_ids"]
    (request,) = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert request.output_ids == [] and request.generated == 0 and request.finish_reason == "length"
    expected = hand.logprobs(prompt, None)
    got = [e.logprob for e in request.prompt_logprobs[1:]]
    assert got == pytest.approx([float(expected[j, t]) for j, t in enumerate(prompt[1:])], abs=0.1)
    assert all(len(e.top) == 2 for e in request.prompt_logprobs[1:])
