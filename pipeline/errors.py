"""User errors: what is wrong, where (file, line, dotted spec path, node) and how to fix it.

Every user-facing failure is a `SpecError` holding one or more `Issue`s; the CLI prints them
and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Issue:
    message: str
    path: str = ""  # dotted spec path, e.g. "generator.nodes.up_64.out_channels"
    file: str | None = None
    line: int | None = None
    hint: str | None = None

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        text = f"{where}{self.path + ': ' if self.path else ''}{self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


@dataclass
class SpecError(Exception):
    issues: list[Issue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(i.format() for i in self.issues)


def user_error(
    message: str, *, path: str = "", file: str | None = None, line: int | None = None, hint: str | None = None
) -> SpecError:
    return SpecError([Issue(message, path, file, line, hint)])


def did_you_mean(word: str, choices) -> str | None:
    """A hint naming the closest choices, or all of them when few and none is close."""
    choices = sorted(set(map(str, choices)))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    if choices and len(choices) <= 12:
        return "expected one of: " + ", ".join(choices)
    return None
