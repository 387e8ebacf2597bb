"""Training data: load files people already have, tokenise with loss on answers only, batch; a built-in set.

    examples = load_examples("train.jsonl")                 # or "builtin:support" (tailor.data.tasks)
    train, val = split_examples(examples, val_fraction=0.05, seed=0)
    tokenized, stats = tokenize_examples(train, tokenizer, max_seq_len=512, overflow="truncate")
    for batch in batch_indices([len(t) for t in tokenized], batch_size=8, seed=0, epoch=0):
        tensors = collate([tokenized[i] for i in batch], pad_id=tokenizer.pad_token_id)
"""

from tailor.data.batching import batch_indices, collate, split_examples
from tailor.data.errors import DataError, DataIssue
from tailor.data.example import REPLAY_SOURCE, Example, replay_index
from tailor.data.load import FORMATS, detect_format, load_examples
from tailor.data.tasks import TASKS, BuiltinTask, get_task, load_builtin
from tailor.data.tokenize import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    TokenizedExample,
    TokenizeStats,
    render_chat,
    tokenize_examples,
)

__all__ = [
    "FALLBACK_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "REPLAY_SOURCE", "TASKS", "BuiltinTask", "DataError",
    "DataIssue", "Example", "TokenizeStats", "TokenizedExample", "batch_indices", "collate", "detect_format",
    "get_task", "load_builtin", "load_examples", "render_chat", "replay_index", "split_examples",
    "tokenize_examples",
]
