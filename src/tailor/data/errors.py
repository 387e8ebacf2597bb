"""One error type for bad training data: it names the file, the line, the field, what is wrong and the fix."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataError", "DataIssue"]


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a data file (line is 1-based, a line of a text file or a row of a table; None
    when it concerns the whole file)."""

    path: str
    problem: str
    fix: str = ""
    line: int | None = None
    field: str | None = None
    unit: str = "line"  # what `line` counts: a text file's lines, or a table's rows (parquet, a dataset)

    def __str__(self) -> str:
        where = (self.path if self.line is None else f"{self.path}:{self.line}" if self.unit == "line"
                 else f"{self.path} {self.unit} {self.line}")
        what = f"field {self.field!r}: {self.problem}" if self.field else self.problem
        return f"{where}: {what}" + (f" Fix: {self.fix}" if self.fix else "")


class DataError(ValueError):
    """Bad training data. Carries every problem found (``issues``); the message lists them all.

    Construct it from one or more DataIssue, or from a plain message string.
    """

    MAX_LISTED = 10

    def __init__(self, issues: DataIssue | list[DataIssue] | str):
        if isinstance(issues, str):
            issues = [DataIssue(path="<data>", problem=issues)]
        elif isinstance(issues, DataIssue):
            issues = [issues]
        if not issues:
            raise ValueError("DataError needs at least one issue")
        self.issues: list[DataIssue] = list(issues)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.issues) == 1:
            return str(self.issues[0])
        listed = "\n".join(f"  - {issue}" for issue in self.issues[: self.MAX_LISTED])
        more = len(self.issues) - self.MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return f"{len(self.issues)} problems in the data:\n{listed}{tail}"

    @property
    def path(self) -> str:
        return self.issues[0].path

    @property
    def line(self) -> int | None:
        return self.issues[0].line

    @property
    def field(self) -> str | None:
        return self.issues[0].field
