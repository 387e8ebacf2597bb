"""Structured output (tailor.serve.constraints): per-row grammars in the engine's batch, and response_format
through a real `tailor serve` server with the official openai client."""

from __future__ import annotations

import asyncio
import copy
import json

import jsonschema
import openai
import pytest
import torch
import xgrammar
from conftest import chat_tokenizer, serving, tiny_chat_llama, tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailor.adapters.format import save_adapter
from tailor.lora import LoraConfig, add_lora, lora_layers
from tailor.serve.constraints import Constraints, OutputFormat, StructuredOutputError, parse_response_format
from tailor.serve.engine import Engine
from tailor.serve.request import Request
from tailor.serve.sampling import SamplingParams
from tailor.serve.server import build_server

PROMPT = "<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n"
OTHER_PROMPT = "<|im_start|>user\nI want a refund.<|im_end|>\n<|im_start|>assistant\n"
# finite answers (enums, a boolean, a fixed-length pattern): a random tiny model completes them
SCHEMA = {"type": "object",
          "properties": {"intent": {"type": "string", "enum": ["refund", "order_status"]},
                         "ok": {"type": "boolean"},
                         "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
          "required": ["intent", "ok", "code"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True}}
API_KEY = "sk-test"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tiny_model_dir(tmp_path_factory.mktemp("structured") / "model")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def _run(engine: Engine, requests: list[Request]) -> list[Request]:
    for request in requests:
        engine.submit(request)
    while not all(r.finished for r in requests):
        engine.step()
    return requests


# --- the request field -------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "named"), [
    ({"type": "json"}, "response_format.type='json' is not one of text, json_object, json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema is missing"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name='a b'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}, "a JSON Schema is an object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "format": 1}},
     "unknown field(s) format"),
    ({"type": "json_object", "schema": {}}, "takes no field schema"),
])
def test_a_bad_response_format_names_the_field(value, named):
    with pytest.raises(StructuredOutputError) as error:
        parse_response_format(value)
    assert named in str(error.value)


def test_text_is_no_constraint_and_json_object_is_any_object():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == OutputFormat()
    parsed = parse_response_format(RESPONSE_FORMAT)
    assert json.loads(parsed.schema) == SCHEMA and parsed.name == "triage"
    assert list(json.loads(parsed.schema)["properties"]) == ["intent", "ok", "code"]  # order kept


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "objekt"}, 'Unsupported type "objekt"'),
    ({"type": "string", "pattern": "(("}, "parenthesis is not closed"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum greater than maximum"),
])
def test_a_schema_that_cannot_be_enforced_names_its_problem(tiny, schema, problem):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    with pytest.raises(StructuredOutputError, match="the JSON Schema cannot be enforced") as error:
        engine.constraints.compile(OutputFormat.json_schema(schema))
    assert problem in str(error.value)


# --- masks -------------------------------------------------------------------------------------------
def test_masks_equal_xgrammars_own_and_leave_other_rows_alone(tiny):
    """Constraints.mask (one batched fill, unpacked, one masked_fill) against xgrammar's reference
    apply_token_bitmask_inplace, row by row; unconstrained rows keep their logits bit for bit."""
    model, tokenizer = tiny
    vocab = model.config.vocab_size
    constraints = Constraints(tokenizer, vocab, frozenset({tokenizer.eos_token_id}))
    rows = [None, constraints.row(OutputFormat.json_schema(SCHEMA)), None, constraints.row(OutputFormat())]
    for token in _ids(tokenizer, '{"intent":"re'):  # move the schema row into a string value
        rows[1].accept(token)
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    ours = constraints.mask(rows, logits.clone())
    for i, row in enumerate(rows):
        if row is None:
            assert torch.equal(ours[i], logits[i])
            continue
        reference = logits[i : i + 1].clone()
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        row.matcher.fill_next_token_bitmask(bitmask)
        xgrammar.apply_token_bitmask_inplace(reference, bitmask)
        assert torch.equal(ours[i], reference[0])
    allowed = [tokenizer.decode([t]) for t in torch.nonzero(ours[1].isfinite()).flatten().tolist()]
    assert allowed == ["f"]  # "re" continues only as "refund"


def test_greedy_constrained_answer_equals_a_step_by_step_reference(tiny):
    """The engine's constrained greedy answer equals HF forwards over the whole sequence, each step's
    logits masked by a fresh xgrammar matcher, argmax (the reference)."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=4)
    prompt = _ids(tokenizer, PROMPT)
    output = OutputFormat.json_schema(SCHEMA)
    [request] = engine.generate([prompt], SamplingParams(max_tokens=80), output=output)
    compiled = engine.constraints.compile(OutputFormat.json_schema(SCHEMA))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, model.config.vocab_size)
    ids, expected = list(prompt), []
    with torch.no_grad():
        while not matcher.is_terminated():
            logits = model(torch.tensor([ids])).logits[:, -1].float()  # (1, V)
            matcher.fill_next_token_bitmask(bitmask)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax())
            matcher.accept_token(token)
            ids.append(token)
            expected.append(token)
    assert expected[-1] == tokenizer.eos_token_id
    assert request.output_ids == expected[:-1] and request.finish_reason == "stop"
    assert request.generated == len(expected) - 1  # finished as the JSON completed: no step for the stop
    jsonschema.validate(json.loads(request.text), SCHEMA)


def test_bf16_greedy_refinement_keeps_to_the_grammar(tiny):
    """In bf16 the engine re-scores the top 4 logits in fp32 (ModelRunner.refine_greedy): a masked token
    among them stays out, so the answer still follows the schema."""
    model, tokenizer = tiny
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), tokenizer, max_batch=2)
    assert engine.runner.split is not None  # the refinement runs for this model
    [request] = engine.generate([_ids(tokenizer, PROMPT)], SamplingParams(max_tokens=80),
                                output=OutputFormat.json_schema(SCHEMA))
    assert request.finish_reason == "stop"
    jsonschema.validate(json.loads(request.text), SCHEMA)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_constrained_rows_in_a_mixed_batch(tiny, temperature):
    """Two constrained rows (a schema, any object) beside unconstrained ones: the constrained answers are
    JSON their format accepts, at temperature 0.7 too; the unconstrained answers equal their answers
    alone."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=8)
    params = SamplingParams(max_tokens=60, temperature=temperature, seed=5)
    plain = [_ids(tokenizer, PROMPT), _ids(tokenizer, OTHER_PROMPT)]
    alone = [r.output_ids for r in engine.generate(plain, params)]
    schema_row = Request(_ids(tokenizer, OTHER_PROMPT), params,
                         constraint=engine.constraints.row(OutputFormat.json_schema(SCHEMA)))
    object_row = Request(_ids(tokenizer, PROMPT), SamplingParams(max_tokens=60, temperature=0.7, seed=2),
                         constraint=engine.constraints.row(OutputFormat()))
    mixed = _run(engine, [Request(plain[0], params), schema_row, object_row, Request(plain[1], params)])
    assert [mixed[0].output_ids, mixed[3].output_ids] == alone
    assert schema_row.finish_reason == "stop"
    jsonschema.validate(json.loads(schema_row.text), SCHEMA)
    assert object_row.finish_reason == "stop" and isinstance(json.loads(object_row.text), dict)


# --- through the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real uvicorn server: the tiny model and two adapters (alpha, beta)."""
    base = tmp_path_factory.mktemp("structured-serve")
    model_dir = tiny_model_dir(base / "model")
    root = base / "adapters"
    for seed, name in enumerate(("alpha", "beta")):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
        save_adapter(model, root / name)
    torch.set_num_threads(1)
    app = build_server(str(model_dir), str(root), max_loras=2, max_lora_rank=8, max_batch=8, dtype="float32",
                       api_key=API_KEY, max_tokens=64, timeout=60)
    with serving(app) as url:
        yield {"url": url, "model": str(model_dir)}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_json_schema_request_to_an_adapter_beside_unconstrained_ones(server, client, temperature):
    """With the openai client: a json_schema chat request to adapter alpha, sent together with
    unconstrained requests to adapter beta and to the base, answers JSON the schema accepts; the
    unconstrained answers equal the same requests sent alone."""
    messages = [{"role": "user", "content": "Where is my order?"}]
    common = {"messages": messages, "max_tokens": 60, "temperature": temperature, "seed": 7}

    async def run():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0) as api:
            def plain(model: str):
                return api.chat.completions.create(model=model, **common)

            together = await asyncio.gather(
                api.chat.completions.create(model="alpha", response_format=RESPONSE_FORMAT, **common),
                plain("beta"), plain(server["model"]),
                api.completions.create(model="beta", prompt=PROMPT, max_tokens=60, temperature=temperature,
                                       seed=3, extra_body={"response_format": RESPONSE_FORMAT}))
            return together, [await plain("beta"), await plain(server["model"])]

    (constrained, beta, base, completion), (alone_beta, alone_base) = asyncio.run(run())
    for answer in (constrained.choices[0].message.content, completion.choices[0].text):
        jsonschema.validate(json.loads(answer), SCHEMA)
    assert constrained.choices[0].finish_reason == "stop"
    assert beta.choices[0].message.content == alone_beta.choices[0].message.content
    assert base.choices[0].message.content == alone_base.choices[0].message.content


def test_streamed_json_schema_answer_adds_up_to_valid_json(client):
    stream = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Refund please"}], max_tokens=60,
        temperature=0.7, seed=2, response_format=RESPONSE_FORMAT, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)
    assert finish == "stop"


def test_json_object_answers_parse(client):
    # seeds 2 and 3: the random tiny model closes its object within max_tokens (most seeds do, not all)
    answer = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Reply in JSON"}], max_tokens=60, temperature=0.7,
        seed=2, n=2, response_format={"type": "json_object"})
    for choice in answer.choices:
        assert isinstance(json.loads(choice.message.content), dict) and choice.finish_reason == "stop"


@pytest.mark.parametrize(("response_format", "problem"), [
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "objekt"}}},
     'the JSON Schema cannot be enforced: Unsupported type "objekt"'),
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "string", "pattern": "(("}}},
     "parenthesis is not closed"),
    ({"type": "xml"}, "response_format.type='xml' is not one of text, json_object, json_schema"),
])
def test_a_bad_schema_is_a_400_naming_the_problem(client, response_format, problem):
    messages = [{"role": "user", "content": "x"}]
    for call in (lambda: client.chat.completions.create(model="alpha", messages=messages,
                                                        response_format=response_format),
                 lambda: client.completions.create(model="alpha", prompt="x", extra_body={
                     "response_format": response_format})):
        with pytest.raises(openai.BadRequestError) as error:
            call()
        assert error.value.status_code == 400
        body = error.value.body
        assert body["param"] == "response_format" and problem in body["message"]


def test_grammar_engines_benchmark_runs_on_a_tiny_tokenizer(tmp_path, capsys):
    """benchmarks/grammar_engines.py end to end with a tiny setting: every engine's masks allow
    every token of the replayed reference answers (it checks), and it reports each engine's costs."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grammar_engines.py"
    spec = importlib.util.spec_from_file_location("grammar_engines", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["grammar_engines"] = bench
    spec.loader.exec_module(bench)
    model, tokenizer = tmp_path / "model", chat_tokenizer()  # byte-level BPE: every engine reads it
    tiny_chat_llama(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path / "grammar.json"
    report = bench.main(["--model", str(model), "--rows", "3", "--answers", "2", "--threads", "1",
                         "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["engines"]) == set(bench.ENGINES)
    xgrammar_result = report["engines"]["xgrammar"]  # tailor's engine is installed with the test extra
    assert xgrammar_result["installed"] and xgrammar_result["mask_row_us"] > 0
    assert "xgrammar" in capsys.readouterr().out
