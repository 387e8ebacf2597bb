"""Turn Examples into token ids and labels: loss only on what the assistant says.

A conversation is rendered with the tokenizer's chat template. The supervised tokens of assistant turn i are
found by rendering twice: the conversation before turn i with the generation prompt (P) and the conversation
through turn i (T). Tokens T[len(P):] are the assistant's content plus its end-of-turn token (trailing
whitespace after the end token, e.g. ChatML's "\\n", carries no loss). We check that P is a token prefix of T
and T a token prefix of the whole conversation; when the tokenizer merges tokens across a turn boundary we
tokenise the turns piece by piece instead (what generation sees: the prompt, then the answer), and when even
the rendered text is not prefix-stable we raise a DataError rather than guess.

Tokenizers without a chat template use FALLBACK_CHAT_TEMPLATE:

    ### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}{eos}\\n\\n

Plain-text examples get loss on every token, with eos appended so the model learns where text ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor.data.errors import DataError, DataIssue
from tailor.data.example import Example

__all__ = ["FALLBACK_CHAT_TEMPLATE", "IGNORE_INDEX", "OVERFLOW_POLICIES", "TokenizeStats", "TokenizedExample",
           "chat_template_for", "render_chat", "tokenize_examples"]

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("truncate", "drop")
CHUNK = 256  # examples per tokenizer call

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    """input_ids and labels of equal length; labels are IGNORE_INDEX (-100) where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    """Counts from tokenize_examples. n_dropped = examples removed by the overflow policy."""

    n_in: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_supervised_tokens: int = 0
    max_len_seen: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = (f"{self.n_kept}/{self.n_in} examples kept ({self.n_truncated} truncated, "
                f"{self.n_dropped} dropped), "
                f"{self.n_tokens} tokens, {self.n_supervised_tokens} with loss")
        if self.drop_reasons:
            text += "; dropped: " + ", ".join(f"{n} {why}" for why, n in self.drop_reasons.items())
        return text


def chat_template_for(tokenizer: Any) -> str | None:
    """The template to render with: the tokenizer's own (None = use it), or FALLBACK_CHAT_TEMPLATE."""
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template (or the documented fallback)."""
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_for(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _assistant_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant turn's answer."""
    messages = example.messages
    try:
        full = render_chat(tokenizer, messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            through = render_chat(tokenizer, messages[: i + 1])
            if not (full.startswith(through) and through.startswith(prefix)):
                raise DataError(DataIssue(
                    example.source, f"the chat template does not render message {i} as a prefix of the whole "
                    "conversation, so the assistant tokens cannot be located.",
                    "use a tokenizer whose chat template renders earlier turns unchanged, or set "
                    "tokenizer.chat_template to one that does.", field=f"messages[{i}]"))
            # the answer = content + end-of-turn token; whitespace after the end token carries no loss
            spans.append((len(prefix), len(prefix) + len(through[len(prefix):].rstrip())))
    except DataError:
        raise
    except Exception as err:  # jinja errors (e.g. "roles must alternate") come from deep inside the template
        raise DataError(DataIssue(example.source, f"the chat template rejected this conversation: {err}",
                                  "fix the message order/roles for this model's template.",
                                  field="messages")) from None
    return full, spans


def _chat_cuts(tokenizer: Any, example: Example) -> tuple[list[str], list[tuple[int, int]]]:
    """Texts to tokenise for a conversation: [full, prompt before answer i..., answer i...], and the spans."""
    full, spans = _assistant_spans(tokenizer, example)
    return [full, *(full[:start] for start, _ in spans), *(full[start:end] for start, end in spans)], spans


def _labels_from_cuts(tokenizer: Any, texts: list[str], spans: list[tuple[int, int]],
                      encoded: list[list[int]]) -> tuple[list[int], list[int]]:
    """Labels by token counts: answer i covers tokens [len(prompt_i), len(prompt_i) + len(answer_i)).

    Valid only when the whole conversation tokenises as prompt_i tokens followed by answer_i tokens,
    which is checked; otherwise the turns are tokenised piece by piece.
    """
    full_ids, *cut_ids = encoded
    prompts, answers = cut_ids[: len(spans)], cut_ids[len(spans):]
    if all(full_ids[: len(p)] == p and full_ids[len(p): len(p) + len(a)] == a
           for p, a in zip(prompts, answers, strict=True)):
        labels = [IGNORE_INDEX] * len(full_ids)
        for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
            labels[len(prompt_ids): len(prompt_ids) + len(answer_ids)] = answer_ids
        return full_ids, labels
    # The tokenizer merged tokens across a turn boundary: tokenise piece by piece.
    full = texts[0]
    boundaries = [0, *(b for span in spans for b in span), len(full)]
    pieces = [full[a:b] for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
    input_ids, labels = [], []
    for index, ids in enumerate(_encode(tokenizer, pieces)):
        input_ids += ids
        labels += ids if index % 2 == 1 else [IGNORE_INDEX] * len(ids)  # odd pieces are assistant answers
    return input_ids, labels


def _tokenize_chunk(tokenizer: Any, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; one tokenizer call per kind for the whole chunk (it is far faster)."""
    chats = [(i, *_chat_cuts(tokenizer, e)) for i, e in enumerate(examples) if e.messages is not None]
    texts = [(i, e.text) for i, e in enumerate(examples) if e.messages is None]
    flat = [text for _, cuts, _ in chats for text in cuts]
    encoded_chats = iter(_encode(tokenizer, flat) if flat else [])
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(examples)
    for i, cuts, spans in chats:
        encoded = [next(encoded_chats) for _ in cuts]
        results[i] = _labels_from_cuts(tokenizer, cuts, spans, encoded)
    eos = tokenizer.eos_token_id
    encoded_texts = _encode(tokenizer, [text for _, text in texts], add_special_tokens=True) if texts else []
    for (i, _), ids in zip(texts, encoded_texts, strict=True):
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # plain text: loss on every token, and eos so the model learns to stop
        results[i] = (ids, list(ids))
    return results


def tokenize_examples(
    examples: list[Example], tokenizer: Any, max_seq_len: int, overflow: str = "truncate"
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenise examples with loss on assistant tokens only (plain text: every token).

    overflow: "truncate" keeps the first max_seq_len tokens (and drops the example if no supervised token is
    left), "drop" removes examples longer than max_seq_len. Both are counted in the returned TokenizeStats.

    Raises:
        DataError: a conversation the chat template rejects, or no example left after filtering.
        ValueError: a bad max_seq_len or overflow policy.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow={overflow!r} is not a policy; use one of: "
                         f"{', '.join(OVERFLOW_POLICIES)}.")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be an integer >= 2.")
    stats = TokenizeStats(n_in=len(examples))
    kept = []
    tokenized = [pair for start in range(0, len(examples), CHUNK)
                 for pair in _tokenize_chunk(tokenizer, examples[start: start + CHUNK])]
    for example, (input_ids, labels) in zip(examples, tokenized, strict=True):
        stats.max_len_seen = max(stats.max_len_seen, len(input_ids))
        if len(input_ids) > max_seq_len:
            if overflow == "drop":
                _drop(stats, f"longer than max_seq_len={max_seq_len} (overflow='drop')")
                continue
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                _drop(stats, f"with no answer token within the first max_seq_len={max_seq_len} tokens")
                continue
            stats.n_truncated += 1
        kept.append(TokenizedExample(input_ids, labels, example.source))
        stats.n_tokens += len(input_ids)
        stats.n_supervised_tokens += sum(label != IGNORE_INDEX for label in labels)
    stats.n_kept = len(kept)
    if not kept:
        where = examples[0].source.rsplit(":", 1)[0] if examples else "<data>"
        why = "; ".join(f"{n} {reason}" for reason, n in stats.drop_reasons.items()) or "no examples given"
        raise DataError(DataIssue(
            where, f"no example left after filtering ({stats.n_dropped} of {stats.n_in} dropped: {why}; "
            f"the longest is {stats.max_len_seen} tokens).",
            f"raise max_seq_len (e.g. to {stats.max_len_seen})"
            + (" or use overflow='truncate'." if overflow == "drop" else ", or shorten the prompts.")))
    return kept, stats


def _drop(stats: TokenizeStats, reason: str) -> None:
    stats.n_dropped += 1
    stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + 1
