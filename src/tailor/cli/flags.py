"""Command-line flags generated from a dataclass's fields, so that a field added to the training config
or to plan's inputs is a flag with no second edit: typed from the field, documented by the field's doc
line, default None (a flag overrides the YAML or the computed default only when it is given)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Field:
    """One generated flag: the keyword it arrives under, its type, its help, and any older spellings."""

    name: str
    kind: object
    doc: str
    aliases: tuple[str, ...] = ()


def option(field: Field) -> inspect.Parameter:
    """`--flag` (with `--no-flag` for a bool) for `field`, as a keyword-only parameter defaulting to None."""
    allowed = set(typing.get_args(field.kind)) - {type(None)} or {field.kind}
    flag = "--" + field.name.replace("_", "-")
    if allowed == {bool}:
        spelled = [f"{flag}/--no-{flag[2:]}", *field.aliases]
        made, annotation = typer.Option(None, *spelled, help=field.doc), bool | None
    else:
        only = next(iter(allowed))
        scalar = only if len(allowed) == 1 and only in (int, float) else str
        made, annotation = typer.Option(None, flag, *field.aliases, help=field.doc), scalar | None
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=made, annotation=annotation)


def with_flags(fields: Iterable[Field]) -> Callable[[F], F]:
    """Give `function(<its own parameters>, **values)` one option per field in place of `**values`; the
    command then receives the given flags in `values` (None where not given)."""
    fields = list(fields)

    def decorate(function: F) -> F:
        fixed = list(inspect.signature(function).parameters.values())[:-1]  # all but **values
        flags = [option(f) for f in fields]
        function.__signature__ = inspect.Signature([*fixed, *flags])  # type: ignore[attr-defined]
        function.__annotations__ = {**{p.name: p.annotation for p in [*fixed, *flags]}, "return": None}
        return function

    return decorate


def given(values: dict[str, object]) -> dict[str, object]:
    """The flags the user gave (typer hands every other one in as None)."""
    return {k: v for k, v in values.items() if v is not None}
