"""tailor serve end to end: the official `openai` client against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest
import torch
from conftest import free_port, serving, tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailor.adapters.format import load_adapter, save_adapter
from tailor.lora import LoraConfig, add_lora, lora_layers, set_active_adapters
from tailor.serve.sampling import stop_token_ids
from tailor.serve.server import build_server

API_KEY, ADMIN_KEY = "sk-test", "admin-test"
RANKS = {"alpha": 2, "beta": 4, "gamma": 8, "wide": 16}  # wide: above --max-lora-rank 8
PROMPT = "<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory and an adapter root holding four adapters for it."""
    base = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dir(base / "model")
    root = base / "adapters"
    for seed, (name, rank) in enumerate(RANKS.items()):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_lora(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
        save_adapter(model, root / name)
    return model_dir, root


@pytest.fixture(scope="module")
def server(files):
    """A real uvicorn server in this process (its engine in its own thread), on a free loopback port."""
    model_dir, root = files
    torch.set_num_threads(1)
    app = build_server(str(model_dir), str(root), max_loras=2, max_lora_rank=8, max_batch=4, dtype="float32",
                       routes=["support=alpha:0.5,beta:0.5"], api_key=API_KEY, admin_key=ADMIN_KEY,
                       max_tokens=64, max_body_bytes=20_000, max_queue=64, timeout=60)
    with serving(app) as url:
        yield {"url": url, "app": app, "model": str(model_dir), "root": root}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(files):
    """HF generate on the same model with the adapters as named adapters: what each answer must be."""
    model_dir, root = files
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name in ("alpha", "beta", "gamma"):
        load_adapter(model, root / name, name=name)
    stops = stop_token_ids(model, tokenizer)

    def answer(prompt: str, adapter: str | None, max_tokens: int) -> str:
        ids = tokenizer(prompt)["input_ids"]
        from tailor.lora import disable_adapters

        with torch.no_grad():
            if adapter is None:
                with disable_adapters(model):
                    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                         eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            else:
                set_active_adapters(model, adapter)
                out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
        return tokenizer.decode(new, skip_special_tokens=True)

    return answer


def test_models_lists_base_adapters_and_routes(client, server):
    models = {m.id: m for m in client.models.list().data}
    assert models[server["model"]].parent is None
    for name in ("alpha", "beta", "gamma", "wide", "support"):
        assert models[name].parent == server["model"], name
    assert models["support"].route == "alpha:0.5,beta:0.5"


@pytest.mark.parametrize("adapter", [None, "alpha", "gamma"])
def test_completion_equals_hf_generate_with_usage(client, server, reference, adapter):
    model = adapter or server["model"]
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == reference(PROMPT, adapter, 12)
    assert response.model == model and response.object == "text_completion"
    tokenizer = AutoTokenizer.from_pretrained(server["model"])
    assert response.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert response.usage.completion_tokens >= 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_streaming_adds_up_to_the_plain_answer(client, server, reference):
    messages = [{"role": "user", "content": "Where is my order?"}]
    plain = client.chat.completions.create(model="beta", messages=messages, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content == reference(PROMPT, "beta", 16)
    assert plain.choices[0].message.role == "assistant"
    usage = plain.usage
    assert usage.prompt_tokens == len(AutoTokenizer.from_pretrained(server["model"])(PROMPT)["input_ids"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens

    completion = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].text for c in completion) == reference(PROMPT, "alpha", 10)


def test_concurrent_requests_for_different_adapters(server, reference):
    names = ["alpha", "beta", "gamma", None] * 3
    prompts = [PROMPT.replace("order", word) for word in ("order", "refund", "kettle", "parcel")] * 3

    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*[
                client.completions.create(model=name or server["model"], prompt=prompt, max_tokens=10,
                                          temperature=0)
                for name, prompt in zip(names, prompts, strict=True)])

    answers = asyncio.run(main())
    for answer, name, prompt in zip(answers, names, prompts, strict=True):
        assert answer.choices[0].text == reference(prompt, name, 10), name


def test_load_and_unload_during_traffic(server, client, reference):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client.completions.create(model="alpha" if i % 2 else server["model"], prompt=PROMPT,
                                           max_tokens=24, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    loaded = raw(server, "/v1/load_lora_adapter", {"lora_name": "gamma-copy", "lora_path": "gamma"},
                 key=ADMIN_KEY)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    for thread in threads:
        thread.join(60)
    for i, text in results.items():
        assert text == reference(PROMPT, "alpha" if i % 2 else None, 24)
    assert len(results) == 4
    copied = client.completions.create(model="gamma-copy", prompt=PROMPT, max_tokens=8, temperature=0)
    assert copied.choices[0].text == reference(PROMPT, "gamma", 8)

    unloaded = raw(server, "/v1/unload_lora_adapter", {"lora_name": "gamma-copy"}, key=ADMIN_KEY)
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma-copy", prompt=PROMPT, max_tokens=2)


def test_ab_route_is_sticky_per_user_and_rolls_back(server, client):
    served = {}
    for user in [f"user-{i}" for i in range(12)]:
        versions = {client.completions.create(model="support", prompt=PROMPT, max_tokens=1, user=user).model
                    for _ in range(3)}
        assert len(versions) == 1, user  # sticky
        served[user] = versions.pop()
    assert set(served.values()) == {"alpha", "beta"}
    rollback = raw(server, "/v1/routes", {"name": "support", "targets": {"alpha": 1}}, key=ADMIN_KEY)
    assert rollback.status_code == 200
    assert {client.completions.create(model="support", prompt=PROMPT, max_tokens=1, user=u).model
            for u in served} == {"alpha"}
    raw(server, "/v1/routes", {"name": "support", "targets": "alpha:0.5,beta:0.5"}, key=ADMIN_KEY)
    metrics = urllib.request.urlopen(server["url"] + "/metrics").read().decode()
    assert 'tailor_route_requests_total{route="support",version="beta"}' in metrics


@dataclass
class Reply:
    status_code: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


def raw(server, path: str, body: bytes | dict | None = None, key: str | None = API_KEY,
        method: str = "POST") -> Reply:
    """A plain HTTP request (urllib), for what the openai client cannot send."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server["url"] + path, data=content, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers), error.read().decode())


def test_client_mistakes_get_openai_errors_with_the_right_status(server, client):
    base = server["model"]
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert error.value.code == "model_not_found"
    for bad in ({"temperature": 5}, {"max_tokens": 65}, {"max_tokens": 0}, {"n": 0}, {"logprobs": 21},
                {"extra_body": {"unknown_field": 1}}, {"top_p": 0}, {"stop": ["a"] * 5}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=base, prompt="hi", **{"max_tokens": 2, **bad})
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=base, prompt="x" * 120, max_tokens=20)
    with pytest.raises(openai.BadRequestError, match="at most 127"):
        client.completions.create(model=base, prompt="x" * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_lora_rank"):  # not a 500 (vLLM's CPU build)
        client.completions.create(model="wide", prompt="hi", max_tokens=2)
    for escape in ("../adapters/alpha", "/etc/passwd", "alpha/../beta"):
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
            client.completions.create(model=escape, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=base, messages=[], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()

    assert raw(server, "/v1/completions", b"{not json").status_code == 400
    assert raw(server, "/v1/completions", b"[1, 2]").status_code == 400
    assert raw(server, "/v1/models", key=None, method="GET").status_code == 401
    big = raw(server, "/v1/completions", {"model": base, "prompt": "x" * 30_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    missing = raw(server, "/v1/nothing-here", {}, method="GET")
    assert missing.status_code == 404 and "error" in missing.json()
    assert raw(server, "/v1/completions", method="GET").status_code == 405

    # admin: wrong key 401, escapes 400, unknown 404
    assert raw(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}).status_code == 401
    for path in ("/etc", "../..", str(server["root"].parent / "model")):
        response = raw(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}, key=ADMIN_KEY)
        assert response.status_code == 400, path
    assert raw(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nope"},
               key=ADMIN_KEY).status_code == 404
    assert raw(server, "/v1/load_lora_adapter", {"lora_name": "a/b"}, key=ADMIN_KEY).status_code == 400
    assert raw(server, "/v1/routes", {"name": "r", "targets": "nope:1"}, key=ADMIN_KEY).status_code == 400
    assert raw(server, "/v1/routes", {"name": "r", "targets": "alpha:x"}, key=ADMIN_KEY).status_code == 400
    assert raw(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}, key=ADMIN_KEY).status_code == 404


def test_queue_full_is_429_and_timeout_is_504(server, client):
    config = server["app"].state.config
    saved = config.max_queue, config.timeout
    try:
        config.max_queue = 0
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model=server["model"], prompt="hi", max_tokens=2)
        assert error.value.response.headers["retry-after"] == "1"
        config.max_queue, config.timeout = saved[0], 0.001
        with pytest.raises(openai.InternalServerError) as error:
            client.completions.create(model=server["model"], prompt="hi", max_tokens=60, temperature=1)
        assert error.value.status_code == 504
    finally:
        config.max_queue, config.timeout = saved


def metric_values(server) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = raw(server, "/metrics", method="GET").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_and_metrics(server, client):
    client.completions.create(model="alpha", prompt="hi", max_tokens=2)  # alpha in a slot
    before = metric_values(server)
    response = client.completions.create(model="alpha", prompt="hi", max_tokens=2)
    after = metric_values(server)
    health = raw(server, "/health", method="GET").json()
    # the answered request's row is freed later in the step that finished it: running may still be 1
    assert health["status"] == "ok" and health["model"] == server["model"] and health["waiting"] == 0

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("tailor_requests_total", model="alpha", adapter="alpha", status="200") == 1
    assert grew("tailor_prompt_tokens_total", adapter="alpha") == response.usage.prompt_tokens
    assert grew("tailor_generated_tokens_total", adapter="alpha") == response.usage.completion_tokens
    assert grew("tailor_request_latency_seconds_count", adapter="alpha") == 1
    assert grew("tailor_time_to_first_token_seconds_count", adapter="alpha") == 1
    assert grew("tailor_adapter_slot_hits_total", adapter="alpha") == 1  # resident: no load, no miss
    assert grew("tailor_adapter_loads_total", adapter="alpha") == 0
    assert after[("tailor_queue_depth", ())] == 0 and after[("tailor_tokens_per_second", ())] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_resolves_its_adapter_once(server, client, stream):
    """model -> adapter reference once per HTTP request (whatever n), read from disk at most once."""
    manager = server["app"].state.engine.adapters
    client.completions.create(model="gamma", prompt=PROMPT, max_tokens=2)  # gamma in host memory
    before = dict(manager.stats)
    response = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=3, n=2, stream=stream)
    if stream:
        list(response)
    assert manager.stats["resolves"] == before["resolves"] + 1
    assert manager.stats["loads"] == before["loads"]


def test_tailor_serve_command(files, tmp_path):
    """The command line as users run it: a subprocess serving the tiny model and its adapters."""
    model_dir, root = files
    shutil.copytree(root / "alpha", tmp_path / "alpha")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tailor.cli", "serve", "--model", str(model_dir),
                                "--adapters", str(tmp_path), "--port", str(port), "--dtype", "float32",
                                "--max-loras", "1", "--max-lora-rank", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list().data} == {str(model_dir), "alpha"}
        answer = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert answer.model == "alpha" and answer.usage.completion_tokens >= 1
        disabled = raw({"url": f"http://127.0.0.1:{port}"}, "/v1/load_lora_adapter", {"lora_name": "alpha"})
        assert disabled.status_code == 403 and "--admin-key" in disabled.json()["error"]["message"]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output, output

    bad = subprocess.run([sys.executable, "-m", "tailor.cli", "serve", "--model", str(model_dir),
                          "--adapters", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    route = subprocess.run([sys.executable, "-m", "tailor.cli", "serve", "--model", str(model_dir),
                            "--adapters", str(tmp_path), "--route", "support=alpha:0.5", "--route", "broken"],
                           capture_output=True, text=True, timeout=120)
    assert route.returncode == 2 and "expected NAME=VERSION:WEIGHT" in route.stderr


def test_a_client_that_leaves_mid_stream_stops_its_request(server, client, monkeypatch):
    engine = server["app"].state.engine
    step = engine.step

    def slow_step():  # 20 ms a step: the request would run ~1 s if nobody stopped it
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = engine.stats.get("abort", 0)
    stream = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=60, temperature=1, seed=1,
                                       stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    # the abort is counted when the request finishes, its row freed later in the same step: wait for both
    while (engine.stats.get("abort", 0) == before or engine.running) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.get("abort", 0) == before + 1
    assert not engine.running
