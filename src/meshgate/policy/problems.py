"""Problems found while loading a policy, each pinned to `file:line:col`.

Every stage (YAML, schema, cross-document checks) reports `Problem`s instead of raising, so the
loader can show a user every mistake at once, sorted the way an editor would list them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class Pos:
    """A 1-based position in a file; line 0 means "the whole file or directory"."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file

    @property
    def short(self) -> str:
        """`file:line`, the form lint findings use."""
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, order=True, slots=True)
class Problem:
    pos: Pos
    message: str

    def __str__(self) -> str:
        return f"{self.pos}: {self.message}"


def render_problems(problems: list[Problem]) -> list[str]:
    """Sorted, de-duplicated `file:line:col: message` strings, as PolicyError carries them."""
    return [str(p) for p in sorted(set(problems))]


def show(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a user value for a message (never raises, even on huge ints)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "<very large number>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= limit else text[: limit - 4] + '..."'
    return describe(value)


def describe(value: object) -> str:
    """The YAML-level type of a value, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
