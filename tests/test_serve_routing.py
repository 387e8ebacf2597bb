"""`model: "auto"` end to end: the default model behind a real server, two adapters described from two
prompt families (code requests, table questions), the official `openai` client.

Each held-out prompt of a family goes to its family's adapter and is answered exactly as when that adapter
is named (greedy); ordinary questions go to the base model; the `model` field, the x-tailor-adapter header
and /metrics say where each went; a router restricted to one adapter leaves the other family to the base.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import serving

from tailor.adapters.metadata import update_metadata
from tailor.serve.server import build_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "_routing_prompts.py"
FAMILIES = ("code", "table")


def _prompts_module():
    spec = importlib.util.spec_from_file_location("_routing_prompts", PROMPTS_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_routing_prompts"] = module
    spec.loader.exec_module(module)
    return module


PROMPTS = _prompts_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Adapters code, table (described from 64 prompts of their family) and plain (not described)."""
    from tailor.adapters.format import save_adapter
    from tailor.lora import LoraConfig, add_lora, lora_layers
    from tailor.models import load_model
    from tailor.routing import describe_prompts

    root = tmp_path_factory.mktemp("routing") / "adapters"
    torch.set_num_threads(1)
    for seed, name in enumerate((*FAMILIES, "plain")):
        model, tokenizer = load_model(dtype=torch.float32, device="cpu")
        add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # an adapter that changes the answers (B = 0 would not)
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        save_adapter(model, root / name)
        if name != "plain":
            update_metadata(root / name, routing=describe_prompts(
                model, tokenizer, PROMPTS.family_prompts(name, "train", 64, system=False)))
    app = build_server(None, str(root), max_loras=3, max_lora_rank=8, max_batch=4, dtype="float32",
                       routes=["desk=auto:code"], max_tokens=32, max_body_bytes=200_000, max_queue=64,
                       timeout=120, admin_key="admin")
    with serving(app) as url:
        yield {"url": url, "app": app, "root": root}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


def _ask(client, model: str, messages: list[dict], **extra):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8,
                                                           temperature=0, **extra)
    return raw.parse(), raw.headers


def _metrics(server) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server["url"] + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_auto_routes_each_family_to_its_adapter_and_answers_as_named(server, client):
    before = _metrics(server)
    base_name = server["app"].state.config.model_name
    changed = 0
    for family in FAMILIES:
        for messages in PROMPTS.family_prompts(family, "test", 3, system=False):
            routed, headers = _ask(client, "auto", messages)
            assert routed.model == family and headers["x-tailor-adapter"] == family
            assert float(headers["x-tailor-route-score"]) <= 1.25
            named, _ = _ask(client, family, messages)
            assert routed.choices[0].message.content == named.choices[0].message.content
            changed += named.choices[0].message.content != _ask(client, base_name, messages)[0].choices[0] \
                .message.content
    assert changed > 0  # the adapters answer differently from the base: the comparison can tell them apart
    after = _metrics(server)
    for family in FAMILIES:
        key = ("tailor_auto_routes_total", (("adapter", family), ("router", "auto")))
        assert after[key] - before.get(key, 0) == 3


def test_a_general_question_goes_to_the_base_model(server, client):
    base_name = server["app"].state.config.model_name
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    key = ("tailor_auto_fallbacks_total", (("router", "auto"),))
    before = _metrics(server).get(key, 0)
    routed, headers = _ask(client, "auto", messages)
    assert routed.model == base_name and headers["x-tailor-adapter"] == ""
    assert float(headers["x-tailor-route-score"]) > 1.25
    base, _ = _ask(client, base_name, messages)
    assert routed.choices[0].message.content == base.choices[0].message.content
    assert _metrics(server)[key] - before == 1


def test_streaming_says_where_it_went(server, client):
    messages = PROMPTS.family_prompts("table", "test", 1, system=False)[0]
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=messages, max_tokens=8, temperature=0, stream=True) as response:
        assert response.headers["x-tailor-adapter"] == "table"
        chunks = list(response.parse())
    assert {c.model for c in chunks} == {"table"}
    named, _ = _ask(client, "table", messages)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == named.choices[0].message.content


def test_a_router_chooses_among_its_own_adapters_only(server, client):
    code = PROMPTS.family_prompts("code", "test", 1, system=False)[0]
    table = PROMPTS.family_prompts("table", "test", 1, system=False)[0]
    assert _ask(client, "desk", code)[0].model == "code"
    assert _ask(client, "desk", table)[1]["x-tailor-adapter"] == ""  # table is not one of desk's
    assert _metrics(server)[("tailor_auto_routes_total", (("adapter", ""), ("router", "desk")))] >= 1


def test_a_router_without_described_adapters_is_a_400(server, client):
    created = httpx.post(server["url"] + "/v1/routes", json={"name": "bare", "targets": "auto:plain"},
                         headers={"Authorization": "Bearer admin"})
    assert created.status_code == 200, created.text
    with pytest.raises(openai.BadRequestError) as error:
        _ask(client, "bare", [{"role": "user", "content": "hi"}])
    assert "routing description" in str(error.value) and "tailor adapters describe" in str(error.value)


def test_serve_refuses_a_router_over_an_undescribed_adapter(server):
    from tailor.serve.routes import RouteError

    with pytest.raises(RouteError, match="plain.*no routing description"):
        build_server(None, str(server["root"]), dtype="float32", routes=["desk=auto:code,plain"])
    description = json.loads((server["root"] / "code" / "tailor_metadata.json").read_text())["routing"]
    assert len(description["centroids"]) == 4 and description["prompts"] == 64



def test_completions_route_by_their_text_too(server, client):
    prompt = PROMPTS.family_prompts("code", "test", 1, system=False)[0][-1]["content"]
    raw = client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=4,
                                                      temperature=0)
    assert raw.parse().model == "code" and raw.headers["x-tailor-adapter"] == "code"
