"""Our calls into transformers raise no FutureWarning, UserWarning or DeprecationWarning.

A deprecation that transformers announces (e.g. `past_key_values` -> `cache` in 5.24) becomes an error
here, so the call is moved to the current API before the old one is removed. pyproject's
`filterwarnings = ["ignore::DeprecationWarning"]` does not apply inside these blocks.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, chat_tokenizer, tiny_chat_llama, tiny_gpt2, tiny_llama, tiny_qwen2

import tailor
from tailor.eval import generate
from tailor.loss import MIN_SHARED_PREFIX, supervised_loss

CATEGORIES = (FutureWarning, UserWarning, DeprecationWarning)


@contextmanager
def warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        for category in CATEGORIES:
            warnings.simplefilter("error", category)
        yield


def _prefixed_batch(prefix: int = MIN_SHARED_PREFIX + 4, rows: int = 3, width: int = 30) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    input_ids[:, :prefix] = input_ids[0, :prefix]  # a shared system prompt
    input_ids[1:, prefix] = (input_ids[0, prefix] + torch.arange(1, rows)) % VOCAB
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, width - 5 :] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : prefix + 2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
def test_shared_prefix_loss_raises_no_warning(build, one_thread):
    model = build()
    batch = _prefixed_batch()
    lengths: list[int] = []  # the prefix path must really run: one row of the prefix, then the suffixes
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: lengths.append(args[0].shape))
    with warnings_are_errors():
        loss_sum, n = supervised_loss(model, batch, share_prefix=True)
        (loss_sum / n).backward()
    assert lengths[0] == (1, MIN_SHARED_PREFIX + 4)


def test_generate_raises_no_warning(one_thread):
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=3)
    conversations = [  # different lengths: batched with left padding
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Triage as JSON."}, {"role": "user", "content": "Where is my order?"}],
    ]
    with warnings_are_errors():
        answers = generate(model, tokenizer, conversations, max_new_tokens=4, batch_size=2)
    assert len(answers) == 2


def test_source_uses_no_deprecated_cache_names():
    """`past_key_values=` / `.past_key_values` only log (once per process) or warn: catch them by name."""
    source = Path(tailor.__file__).resolve().parent
    deprecated = re.compile(r"past_key_values\s*=|\.past_key_values\b|\[[\"']past_key_values[\"']\]")
    offenders = [
        f"{path.relative_to(source.parent)}:{number}"
        for path in sorted(source.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if deprecated.search(line.split("#", 1)[0])
    ]
    assert offenders == []
