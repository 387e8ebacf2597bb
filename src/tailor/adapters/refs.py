"""Names and references of the adapter store: the rule a name follows, `NAME@VERSION` / `NAME@TAG`
references, and the metric `tailor adapters list` shows. Plain rules, no file access: the store, the
server and the command line check names with the same functions."""

from __future__ import annotations

import re
from typing import Any

LATEST = "latest"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = ("letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters "
             "(a name, never a path)")
# The metric `list` shows, first one present wins (eval's task metrics, then losses).
KEY_METRICS = ("exact_match", "field_accuracy", "accuracy", "best_val_loss", "final_val_loss",
               "final_train_loss")


class StoreError(ValueError):
    """A bad name, reference or store operation; the message says what is wrong and the fix."""


def check_name(name: str, what: str = "adapter name") -> str:
    """`name` if it is a valid store name; a StoreError naming the rule otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(f"{what} {name!r} is not allowed: use {NAME_RULE}.")
    return name


def check_tag(tag: str) -> str:
    check_name(tag, "tag")
    if tag.isdigit() or tag == LATEST:
        raise StoreError(f"tag {tag!r} is not allowed: a number is a version and {LATEST!r} means the newest "
                         "version; pick a word such as prod or staging.")
    return tag


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'NAME@SELECTOR' -> (NAME, SELECTOR); 'NAME' -> (NAME, None). Both parts checked."""
    if not isinstance(ref, str) or not ref:
        raise StoreError(f"empty adapter reference {ref!r}; write NAME, NAME@VERSION or NAME@TAG.")
    name, sep, selector = ref.partition("@")
    check_name(name)
    if sep and not selector:
        raise StoreError(f"reference {ref!r} ends with '@'; write NAME@VERSION (e.g. {name}@1) or NAME@TAG.")
    if sep:
        check_name(selector, "version or tag")
    return name, selector if sep else None


def key_metric(metrics: dict[str, Any] | None) -> tuple[str, Any] | None:
    if not isinstance(metrics, dict):
        return None
    for key in KEY_METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return key, metrics[key]
    return None



__all__ = ["KEY_METRICS", "LATEST", "NAME_RE", "NAME_RULE", "StoreError", "check_name", "check_tag",
           "key_metric", "parse_ref"]
