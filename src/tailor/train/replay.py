"""Replay: the base model's own answers to general prompts, mixed into training (self-distillation).

A narrow fine-tune teaches the model to answer everything in the task's shape. Mixing in conversations
the base model already handles, answered by the base model itself, keeps those answers where they were
while the task is learned (rehearsal as in Robins 1995; with the model's own outputs as targets, the
self-distillation of "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning", Yang et
al. 2024). No outside data is needed: the answers are generated once, greedily, with the serving engine
(tailor.eval.generate), and cached on disk keyed by the model, the prompts and the generation settings.

How a replayed answer is learned is the config's replay_loss (tailor.loss.supervised_loss): "ce", the
cross-entropy on its tokens, or "kl", the divergence from the base model's whole next-token distribution
at those tokens (distillation as in Hinton et al. 2015, on the base's own answers: Learning without
Forgetting, Li and Hoiem 2016). A small base answers many prompts wrongly ("Add 14 and 23." -> "The
answer is 21."); cross-entropy sharpens the model onto those answers, the divergence only holds it where
the base was.

REPLAY_PROMPTS is disjoint from the retention set (tailor.eval.retention), so retention still measures
what was not trained on; a test asserts it. Answers that did not finish within REPLAY_MAX_NEW_TOKENS are
left out, so training never teaches the model to stop mid-sentence.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tailor.data import REPLAY_SOURCE, Example
from tailor.files import atomic_write_text

REPLAY_MAX_NEW_TOKENS = 128

_TOPICS = ("photosynthesis", "gravity", "the water cycle", "a volcano", "electricity", "a rainbow",
           "the internet", "democracy", "a vaccine", "an atom", "inflation", "a black hole", "recycling",
           "the moon's phases", "a computer virus", "evolution", "an earthquake", "the human brain",
           "a solar panel", "a library", "a thermometer", "friction", "a hurricane", "the immune system",
           "a budget", "a glacier", "a magnet", "an election", "a battery", "the seasons")
_ADVICE = ("sleeping better", "saving money", "learning a new language", "staying focused while studying",
           "keeping a plant alive", "writing a good email", "preparing for a job interview",
           "staying hydrated", "making new friends", "reducing stress", "cooking rice", "running a first 5k",
           "organizing a desk", "giving a short speech", "remembering names")
_WRITING = ("a lighthouse", "autumn leaves", "a lost key", "a city bus", "a cup of tea", "a mountain lake",
            "a quiet library", "a thunderstorm", "a paper boat", "an old clock", "a busy market",
            "a snowy street", "a garden in spring", "a train station", "a campfire")
_CODE = ("counts the vowels in a string", "returns the factorial of n", "removes duplicates from a list",
         "counts how many times a letter appears in a word", "checks whether a number is prime",
         "returns the last element of a list", "joins a list of words with spaces",
         "returns the number of words in a sentence", "swaps two variables",
         "returns the minimum of three numbers", "converts Celsius to Fahrenheit",
         "returns the average of a list", "multiplies two numbers", "returns the first character of a string",
         "squares every number in a list")
_QUESTIONS = ("Which planet is known as the Red Planet?", "How many continents are there?",
              "What do bees make?", "What is frozen water called?",
              "Which animal is known as the king of the jungle?",
              "In which country are the pyramids of Giza?", "What is the largest planet in our solar system?",
              "Which is the closest star to Earth?", "What do caterpillars turn into?",
              "What instrument has black and white keys?", "How many hours are in a day?",
              "How many months are in a year?", "How many minutes are in an hour?",
              "Which animal has eight legs?", "How many wheels does a bicycle have?",
              "What is the freezing point of water in Fahrenheit?", "Which month comes after March?",
              "Which day comes after Monday?", "What shape has three sides?",
              "Who was the first person to walk on the moon?", "Which gas do people need to breathe?",
              "Which metal does a magnet attract?", "Which country is famous for the Eiffel Tower?",
              "Which city is known as the Big Apple?", "What is the main ingredient of guacamole?",
              "What do you call a baby dog?", "What do you call a baby cat?",
              "Which sense do we use our ears for?", "What is the hardest natural substance?",
              "Which bird is a symbol of peace?")
_SUMS = ((14, 23), (36, 41), (17, 8), (64, 19), (120, 45), (73, 26), (9, 58), (31, 31), (5, 9), (40, 60))
_DIFFERENCES = ((19, 7), (100, 35), (45, 15), (9, 4), (80, 20))
_PRODUCTS = ((4, 6), (7, 8), (9, 3), (12, 5), (6, 6), (11, 4), (2, 10), (5, 5))
_INSTRUCTIONS = ("List three fruits.", "Name two planets.", "Name three countries in Europe.",
                 "List three vegetables.", "Name three musical instruments.",
                 "Write the word 'garden' in capital letters.", "Give me three words that rhyme with 'cat'.",
                 "Sort these numbers from smallest to largest: 9, 2, 7, 4.", "Name the months of spring.",
                 "Write the letters A to F.", "Give me a word that means 'very big'.",
                 "Give me the opposite of 'early'.", "Translate 'thank you' into Spanish.",
                 "Name a fruit that is yellow.", "Count from 5 to 1.",
                 "List three things you find in a kitchen.", "Name two oceans.", "Give me three verbs.",
                 "Name a mammal that can fly.", "Write 'good night' backwards.")
_WORDS = ("quickly", "ancient", "bright", "gentle", "brave", "curious", "fragile", "honest", "generous",
          "silent")

REPLAY_PROMPTS: tuple[str, ...] = (
    *(f"In one or two sentences, explain {topic}." for topic in _TOPICS),
    *(f"Give me one short tip for {goal}." for goal in _ADVICE),
    *(f"Write two sentences describing {thing}." for thing in _WRITING),
    *(f"Write a short Python function that {task}." for task in _CODE),
    *_QUESTIONS,
    *(f"Add {a} and {b}." for a, b in _SUMS),
    *(f"Subtract {b} from {a}." for a, b in _DIFFERENCES),
    *(f"Multiply {a} by {b}." for a, b in _PRODUCTS),
    *_INSTRUCTIONS,
    *(f"What does the word '{word}' mean?" for word in _WORDS),
    *(f"Use the word '{word}' in a sentence." for word in _WORDS),
)


def load_replay_prompts(path: str | Path) -> tuple[str, ...]:
    """The prompts of a text file, one per line; blank lines and lines opening with # are skipped.

    Raises:
        DataError: the file is missing or holds no prompt, or a line is a prompt of the retention set
            (retention would then measure what was trained on).
    """
    from tailor.data import DataError, DataIssue
    from tailor.eval.retention import RETENTION_ITEMS

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(DataIssue(str(path), f"cannot be read as UTF-8 text ({error})",
                                  "give a text file with one general prompt per line")) from None
    held_out = {_normal(item.prompt) for item in RETENTION_ITEMS}
    prompts, issues = [], []
    for number, line in enumerate(lines, start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if _normal(prompt) in held_out:
            issues.append(DataIssue(str(path), f"{prompt!r} is a prompt of the retention set, which must "
                                    "stay unseen in training", "remove the line or reword it", line=number))
        prompts.append(prompt)
    if issues:
        raise DataError(issues)
    if not prompts:
        raise DataError(DataIssue(str(path), "holds no prompt", "write one general prompt per line"))
    return tuple(prompts)


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def replay_cache_dir() -> Path:
    """Where replay answers are kept: $TAILOR_CACHE/replay (default ~/.cache/tailor/replay)."""
    from tailor.models.gguf_cache import tailor_cache_dir

    return tailor_cache_dir() / "replay"


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's weights (the sum and the sum of squares of each parameter, in float64):
    the same model gives the same digest wherever it is loaded from, a changed one another."""
    stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()])
    return hashlib.sha256(stats.cpu().numpy().tobytes()).hexdigest()


def replay_cache_file(model: nn.Module, prompts: tuple[str, ...], max_new_tokens: int,
                      cache_dir: Path | None = None) -> Path:
    """The cache file of `model`'s answers to `prompts`: named by a digest of the weights (in the dtype
    they are loaded in), the prompts and the token limit."""
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model), "prompts": list(prompts),
                                     "max_new_tokens": max_new_tokens,
                                     "dtype": str(next(model.parameters()).dtype)}).encode())
    return (cache_dir or replay_cache_dir()) / f"{key.hexdigest()[:24]}.jsonl"


def replay_examples(model_name: str, prompts: tuple[str, ...] = REPLAY_PROMPTS,
                    max_new_tokens: int = REPLAY_MAX_NEW_TOKENS, cache_dir: Path | None = None,
                    batch_size: int = 64, device: str | None = None) -> tuple[list[Example], dict[str, Any]]:
    """The base model's greedy answers to `prompts`, as chat Examples (one user turn, one answer).

    Loaded from the cache when this model (its weights), these prompts and these settings were answered
    before; otherwise the model is loaded on its own (bf16 where that is fast: the dtype `tailor eval`
    uses), answered through the engine, and the cache file written atomically. Returns (examples, record)
    where record says the cache file, whether it was reused, how many answers were kept, and the seconds
    it took.
    """
    from tailor.eval.generate import complete
    from tailor.models import load_model, parse_dtype

    started = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=parse_dtype("auto", device), device=device)
    path = replay_cache_file(model, prompts, max_new_tokens, cache_dir)
    reused = path.is_file()
    if reused:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        answers = complete(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
        rows = [{"prompt": p, "answer": text, "finished": reason == "stop"}
                for p, (text, reason) in zip(prompts, answers, strict=True)]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    del model
    examples = [Example([{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["answer"]}], None, f"{REPLAY_SOURCE}:{i}")
                for i, row in enumerate(rows) if row["finished"] and row["answer"]]
    return examples, {"cache": str(path), "reused": reused, "prompts": len(rows), "kept": len(examples),
                      "seconds": round(time.perf_counter() - started, 1)}


def mix_replay(train: list[Example], replay: list[Example], ratio: float) -> list[Example]:
    """`train` followed by `replay`, repeated in turn, so that replayed examples make up `ratio` of the
    result (rounded to whole examples); the batcher shuffles them in.

    Raises:
        ValueError: ratio outside [0, 1), or a positive ratio with no replay example.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"replay ratio {ratio!r} must be in [0, 1)")
    if ratio == 0:
        return list(train)
    if not replay:
        raise ValueError("replay is on but no replayed answer is left (every one was cut at the token limit)")
    n_replay = round(ratio * len(train) / (1 - ratio))
    return [*train, *(replay[i % len(replay)] for i in range(n_replay))]


__all__ = ["REPLAY_MAX_NEW_TOKENS", "REPLAY_PROMPTS", "load_replay_prompts", "mix_replay",
           "model_fingerprint", "replay_cache_dir", "replay_cache_file", "replay_examples"]
