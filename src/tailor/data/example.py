"""`Example`, the normalised form of one training record; its own module so that both the file loader
(load.py) and the built-in dataset generator (support.py) can use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REPLAY_SOURCE", "Example", "replay_index"]

REPLAY_SOURCE = "replay"  # source "replay:<index>": a replayed base-model answer (tailor.train.replay)


def replay_index(source: str) -> int:
    """Which replayed base-model answer an example with this `source` holds ("replay:7" -> 7); -1 for an
    example that replays none."""
    prefix = f"{REPLAY_SOURCE}:"
    return int(source[len(prefix):]) if source.startswith(prefix) else -1


@dataclass
class Example:
    """One training example: a conversation (``messages``) or plain text (``text``), never both.

    source is where it came from, "file.jsonl:12" (1-based line), so later errors can point back to it.
    """

    messages: list[dict[str, str]] | None
    text: str | None
    source: str

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the last assistant message: what a model is asked."""
        if self.messages is None:
            return []
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str | None:
        """The reference answer: the content of the last assistant message (None for plain text)."""
        if self.messages is None:
            return None
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]
