"""tailor.routing: pooled base-model states against transformers' own hidden states, the description
(k-means, radius, fp16 centroids) by hand, `tailor train` describing its adapter, and
`tailor adapters describe` writing a description that round-trips, with bad inputs named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_model_dir, write_arithmetic_jsonl
from typer.testing import CliRunner

from tailor.routing import Described, choose, describe_embeddings, pooled_states
from tailor.routing.describe import RADIUS_QUANTILE, kmeans, nearest_distance
from tailor.routing.embed import content_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layer", [0, 1])
def test_pooled_states_equal_the_mean_of_transformers_hidden_states(layer):
    model = tiny_llama()
    prompts = [[5, 9, 17, 33, 2], [7, 7, 40]]
    pooled = pooled_states(model, prompts, layer)
    for row, ids in zip(pooled, prompts, strict=True):
        with torch.no_grad():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        # (transformers' last entry has the final norm applied; the ones before are the layers' outputs)
        expected = states[layer][0].mean(0)
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)


def test_pooled_states_switch_the_adapter_off():
    from tailor.lora import LoraConfig, add_lora, lora_layers

    model = tiny_llama()
    before = pooled_states(model, [[3, 4, 5, 6]], 1)
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.fill_(0.5)
        changed = model(torch.tensor([[3, 4, 5, 6]]), output_hidden_states=True).hidden_states[1][0].mean(0)
    assert not torch.allclose(changed, before[0], atol=1e-3)  # the adapter does change layer 1
    torch.testing.assert_close(pooled_states(model, [[3, 4, 5, 6]], 1), before)


def test_content_tokens_leave_out_the_template_frame():
    frame = ([1, 2, 3, 4], [8, 9])
    assert content_tokens([1, 2, 3, 4, 50, 51, 8, 9], frame) == [50, 51]
    assert content_tokens([1, 2, 60, 61, 62, 9], frame) == [60, 61, 62]  # a system turn: only the shared part
    assert content_tokens([1, 2, 3, 4, 8, 9], frame) == [1, 2, 3, 4, 8, 9]  # nothing left: all of it


def test_description_by_hand():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(40, 6, generator=generator) * 0.1 + torch.tensor([5.0, 0, 0, 0, 0, 0])
    right = torch.randn(40, 6, generator=generator) * 0.1 - torch.tensor([5.0, 0, 0, 0, 0, 0])
    points = torch.cat([left, right])
    description = describe_embeddings(points, layer=0)
    centroids = torch.tensor(description["centroids"])
    assert len(centroids) == 4 and description["prompts"] == 80  # k = min(4, 80 // 16)
    assert torch.equal(centroids, centroids.half().float())  # stored as fp16 values
    expected = torch.quantile(nearest_distance(points, centroids), RADIUS_QUANTILE)
    assert description["radius"] == pytest.approx(float(expected))
    # k = 2 finds the two clusters' means
    two = kmeans(points, 2)
    means = torch.stack([left.mean(0), right.mean(0)])
    order = two[:, 0].argsort(descending=True)
    torch.testing.assert_close(two[order], means)
    # a point of the cloud is inside; one far away is not; the closest of two adapters wins
    inside = Described("left", centroids, description["radius"], 0)
    other = Described("other", torch.full((1, 6), 50.0), 1.0, 0)
    assert choose(left[0], [inside, other]).adapter == "left"
    far = choose(torch.full((6,), -20.0), [inside, other])
    assert far.adapter is None and far.closest == "left" and far.score > 1.25


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("routing") / "model")


def test_train_describes_its_adapter(tiny_dir, tmp_path):
    from tailor.adapters.metadata import read_metadata
    from tailor.data import load_examples
    from tailor.models import load_model
    from tailor.routing import prompt_ids
    from tailor.routing.embed import template_frame
    from tailor.train import load_config, train

    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    config = load_config(model=str(tiny_dir), data=str(data), out=str(tmp_path / "run"), max_steps=2,
                         batch_size=8, rank=4, lora_alpha=8, progress=False, precision="fp32", num_threads=1)
    train(config)
    description = read_metadata(tmp_path / "run" / "adapter")["routing"]
    assert description["layer"] == 0 and description["pooling"] == "mean"
    assert description["prompts"] == len(load_examples(str(data))) - 5  # the training split (5 validate)
    # its own training prompts lie inside its radius, as seen from the base model
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    frame = template_frame(tokenizer)
    ids = [content_tokens(prompt_ids(tokenizer, e.prompt), frame) for e in load_examples(str(data))]
    described = Described.of("arith", description, "test")
    routed = [choose(x, [described]).adapter for x in pooled_states(model, ids, 0)]
    assert routed.count("arith") >= 0.9 * len(routed)


def _adapter(tiny_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from tailor.adapters.format import save_adapter
    from tailor.lora import LoraConfig, add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    save_adapter(model, out)
    return out


def test_adapters_describe_round_trips_and_names_bad_inputs(tiny_dir, tmp_path):
    from tailor.adapters.metadata import read_metadata
    from tailor.cli import app
    from tailor.data import load_examples
    from tailor.models import load_model
    from tailor.routing import describe_prompts, example_prompts

    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    runner = CliRunner()
    result = runner.invoke(app, ["adapters", "describe", str(adapter), "--examples", str(data),
                                 "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    stored = read_metadata(adapter)["routing"]
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    expected = describe_prompts(model, tokenizer, example_prompts(load_examples(str(data))))
    assert json.loads(json.dumps(expected))["centroids"] == stored["centroids"]
    assert stored["radius"] == pytest.approx(expected["radius"]) and stored["prompts"] == 48
    assert stored["base"]["config_sha256"] == expected["base"]["config_sha256"]
    Described.of("a", stored, "stored")  # reads back

    before = (adapter / "tailor_metadata.json").read_bytes()
    broken = tmp_path / "broken.jsonl"
    lines = data.read_text().splitlines()
    broken.write_text("\n".join(lines[:2] + ['{"messages": [{"role": "user"}]}'] + lines[3:]) + "\n")
    result = runner.invoke(app, ["adapters", "describe", str(adapter), "--examples", str(broken),
                                 "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "broken.jsonl:3" in result.output, result.output
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain {i}"}) + "\n" for i in range(20)))
    result = runner.invoke(app, ["adapters", "describe", str(adapter), "--examples", str(text)])
    assert result.exit_code == 2 and "0 prompts" in result.output, result.output
    result = runner.invoke(app, ["adapters", "describe", str(tmp_path / "nowhere"), "--examples", str(data)])
    assert result.exit_code == 2 and "nowhere" in result.output, result.output
    assert (adapter / "tailor_metadata.json").read_bytes() == before  # nothing half-written

    from tailor.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    ref, _ = store.add("arith", _adapter(tiny_dir, tmp_path / "other"))
    result = runner.invoke(app, ["adapters", "describe", ref, "--examples", str(data), "--model",
                                 str(tiny_dir), "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    assert read_metadata(store.resolve(ref))["routing"]["centroids"] == stored["centroids"]


def _long_llama(seed: int = 0, **overrides):
    """A tiny Llama with room for the families' prompts (512 characters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, **overrides)).eval()


def test_routing_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/routing.py with a tiny setting: every part runs and its tables add up."""
    import importlib.util
    import sys

    tiny_dir = tiny_model_dir(tmp_path / "model", builder=_long_llama)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "routing.py"
    spec = importlib.util.spec_from_file_location("routing_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["routing_benchmark"] = bench
    spec.loader.exec_module(bench)
    results = bench.main(["--model", str(tiny_dir), "--tasks", "family:code,family:table", "--train-prompts",
                          "16", "--test-prompts", "4", "--general", "5", "--layers", "0,1",
                          "--latency-requests", "2", "--new-tokens", "2", "--json", str(tmp_path / "r.json")])
    assert [found["layer"] for found in results["layers"]] == [0, 1]
    for found in results["layers"]:
        rows = found["confusion"]
        assert [sum(rows[n].values()) for n in ("code", "table", "general")] == [4, 4, 5]
        assert found["accuracy"] == (rows["code"]["code"] + rows["table"]["table"]) / 8
    assert results["latency"]["requests"] == 2
    assert json.loads((tmp_path / "r.json").read_text())["machine"]["threads"] >= 1


def test_router_specs_parse_and_refuse_mistakes():
    from tailor.serve.routes import RouteError, parse_route

    route = parse_route("desk=auto:billing,returns,billing")
    assert route.auto and route.adapters == ("billing", "returns") and route.spec() == "auto:billing,returns"
    assert not parse_route("support=a:0.9,b:0.1").auto
    for bad in ("desk=auto:", "desk=auto:billing:0.5", "auto=auto:billing", "auto=billing:1"):
        with pytest.raises(RouteError):
            parse_route(bad)


def test_a_description_leaves_out_replayed_answers(tiny_dir):
    from tailor.data import Example
    from tailor.models import load_model
    from tailor.routing.describe import describe_training

    def chat(text: str, source: str) -> Example:
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
        return Example(messages, None, source)

    task = [chat(f"add {i} {i + 1}", f"train.jsonl:{i + 1}") for i in range(10)]
    replayed = [chat(f"What is the capital of country {i}?", f"replay:{i}") for i in range(30)]
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    assert describe_training(model, tokenizer, task + replayed)["prompts"] == 10
    assert describe_training(model, tokenizer, task[:5] + replayed) is None  # under 8 prompts of its own


def test_auto_leaves_out_descriptions_it_cannot_use(tiny_dir, tmp_path):
    from tailor.adapters.metadata import read_metadata, update_metadata
    from tailor.data import load_examples
    from tailor.models import load_model
    from tailor.routing import RoutingDescriptionError, describe_prompts, example_prompts
    from tailor.serve.adapters import AdapterManager
    from tailor.serve.auto import ContentRouter

    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    prompts = example_prompts(load_examples(str(write_arithmetic_jsonl(tmp_path / "train.jsonl"))))
    description = describe_prompts(model, tokenizer, prompts)
    root = tmp_path / "adapters"
    for name in ("good", "other_base", "broken", "plain"):
        _adapter(tiny_dir, root / name)
    update_metadata(root / "good", routing=description)
    update_metadata(root / "other_base", routing={**description, "base": {**description["base"],
                                                                           "config_sha256": "0" * 64}})
    update_metadata(root / "broken", routing={**description, "centroids": []})
    router = ContentRouter(model, tokenizer, AdapterManager(model, root, max_loras=2, max_lora_rank=4))
    assert [d.name for d in router.candidates(None)] == ["good"]
    for name, problem in (("other_base", "described with base"), ("broken", "'centroids'")):
        with pytest.raises(RoutingDescriptionError, match=problem):
            router.candidates((name,))
    assert router.candidates(("plain",)) == []
    # described again while serving: the new file is read
    update_metadata(root / "plain", routing=description)
    assert read_metadata(root / "plain")["routing"] == description
    assert [d.name for d in router.candidates(None)] == ["good", "plain"]
