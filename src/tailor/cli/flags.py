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
    default: object = None  # shown in the help; the flag itself defaults to None (not given)


def option(field: Field) -> inspect.Parameter:
    """`--flag` (with `--no-flag` for a bool) for `field`, as a keyword-only parameter defaulting to None."""
    allowed = set(typing.get_args(field.kind)) - {type(None)} or {field.kind}
    flag = "--" + field.name.replace("_", "-")
    shown = {"show_default": str(field.default)} if field.default is not None else {}
    if allowed == {bool}:
        spelled = [f"{flag}/--no-{flag[2:]}", *field.aliases]
        made, annotation = typer.Option(None, *spelled, help=field.doc, **shown), bool | None
    else:
        only = next(iter(allowed))
        scalar = only if len(allowed) == 1 and only in (int, float) else str
        made, annotation = typer.Option(None, flag, *field.aliases, help=field.doc, **shown), scalar | None
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


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its doc: the string literal under each field in the class body (the convention of
    the training config's sections and of plan's inputs), folded onto one line for the help screen."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())  # type: ignore[attr-defined]
    return docs


def dataclass_fields(cls: type, aliases: dict[str, tuple[str, ...]] | None = None) -> list[Field]:
    """A Field per field of dataclass `cls`, documented by its doc line and showing its default."""
    import dataclasses

    types, docs, aliases = typing.get_type_hints(cls), field_docs(cls), aliases or {}
    return [Field(f.name, types[f.name], docs.get(f.name, ""), aliases.get(f.name, ()),
                  None if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)]
