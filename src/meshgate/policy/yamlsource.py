"""Read YAML into plain Python values plus a position index, so later errors can name file:line:col.

ruamel's round-trip loader records `.lc` positions on mappings and sequences. We copy the document
into plain dict/list/str/int/float/bool/None (pydantic then sees ordinary data) and keep a side
index from each value's path, e.g. `("spec", "egress", 0, "destination")`, to where its key and
value start. Anything ruamel or our walk rejects becomes a `Problem`, never an exception.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from meshgate.policy.problems import Pos, Problem, show

PathItem = str | int
Path = tuple[PathItem, ...]

MAX_NODES = 100_000  # alias bombs expand beyond this; real policies are far smaller
MAX_DEPTH = 64


@dataclass(frozen=True)
class NodePos:
    """Where a value's key (None for list items and roots) and the value itself start."""

    key: Pos | None
    value: Pos


@dataclass
class YamlDoc:
    """One `---` document: plain data plus positions of every key and value in it."""

    file: str
    data: Any
    start: Pos
    index: dict[Path, NodePos] = field(default_factory=dict)

    def value_pos(self, path: Path) -> Pos:
        """Position of the value at `path`, or of its nearest ancestor that has one."""
        node = self._nearest(path)
        return node.value

    def key_pos(self, path: Path) -> Pos:
        """Position of the key at `path` (the value for list items), or the nearest ancestor."""
        node = self._nearest(path)
        return node.key or node.value

    def _nearest(self, path: Path) -> NodePos:
        for end in range(len(path), -1, -1):
            node = self.index.get(path[:end])
            if node is not None:
                return node
        return NodePos(None, self.start)


class _TooBig(Exception):
    pass


_DUP_KEY = re.compile(r'found duplicate key "(.*?)"')


def parse_documents(file: str, text: str) -> tuple[list[YamlDoc], list[Problem]]:
    """Parse every document in `text`; documents before a syntax error are still returned."""
    docs: list[YamlDoc] = []
    problems: list[Problem] = []
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    scalar_docs: list[tuple[int, YamlDoc]] = []
    try:
        for i, raw in enumerate(yaml.load_all(text)):
            if raw is None:
                continue  # an empty document, e.g. a trailing `---` or a comment-only file
            doc = _convert(file, raw, problems)
            if doc is None:
                continue
            docs.append(doc)
            if not isinstance(raw, dict | list):
                scalar_docs.append((i, doc))
    except MarkedYAMLError as e:
        problems.append(_syntax_problem(file, e))
    except RecursionError:
        problems.append(Problem(Pos(file, 1, 1), "YAML is nested too deeply"))
    except Exception as e:  # ruamel raises assorted non-YAML errors on hostile input
        problems.append(Problem(Pos(file, 1, 1), f"cannot parse YAML: {_one_line(str(e))}"))
    if scalar_docs:
        _place_scalar_docs(file, text, scalar_docs)
    return docs, problems


def _place_scalar_docs(file: str, text: str, scalar_docs: list[tuple[int, YamlDoc]]) -> None:
    """Scalars carry no `.lc`; compose the stream once more to find where those documents start."""
    try:
        marks = [node.start_mark for node in YAML(typ="rt").compose_all(text)]
    except Exception:
        return
    for i, doc in scalar_docs:
        if i < len(marks):
            doc.start = Pos(file, marks[i].line + 1, marks[i].column + 1)
            doc.index[()] = NodePos(None, doc.start)


def _syntax_problem(file: str, e: MarkedYAMLError) -> Problem:
    mark = e.problem_mark or e.context_mark
    pos = Pos(file, mark.line + 1, mark.column + 1) if mark is not None else Pos(file, 1, 1)
    problem = str(e.problem or e.context or "invalid YAML")
    dup = _DUP_KEY.search(problem)
    if dup:
        return Problem(pos, f'duplicate key "{dup.group(1)}"')
    context = f" ({_one_line(str(e.context))})" if e.context and e.problem else ""
    return Problem(pos, f"YAML syntax error: {_one_line(problem)}{context}")


def _one_line(s: str) -> str:
    return " ".join(s.split())[:200]


def _lc(node: Any) -> dict[Any, list[int]]:
    lc = getattr(node, "lc", None)
    data = getattr(lc, "data", None) if lc is not None else None
    return data if isinstance(data, dict) else {}


def _start(file: str, node: Any) -> Pos:
    lc = getattr(node, "lc", None)
    line, col = getattr(lc, "line", None), getattr(lc, "col", None)
    if isinstance(line, int) and isinstance(col, int):
        return Pos(file, line + 1, col + 1)
    return Pos(file, 1, 1)


def _convert(file: str, raw: Any, problems: list[Problem]) -> YamlDoc | None:
    doc = YamlDoc(file=file, data=None, start=_start(file, raw))
    doc.index[()] = NodePos(None, doc.start)
    walker = _Walker(doc, problems)
    try:
        doc.data = walker.plain(raw, (), doc.start, 0)
    except _TooBig:
        problems.append(Problem(doc.start, "document is too large (too many nodes or aliases)"))
        return None
    return doc


class _Walker:
    def __init__(self, doc: YamlDoc, problems: list[Problem]) -> None:
        self.doc = doc
        self.problems = problems
        self.count = 0
        self.active: set[int] = set()

    def plain(self, node: Any, path: Path, here: Pos, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                self.problems.append(Problem(here, "YAML is nested too deeply"))
                return None
            if id(node) in self.active:
                self.problems.append(Problem(here, "recursive YAML alias"))
                return None
            self.active.add(id(node))
            try:
                if isinstance(node, dict):
                    return self._mapping(node, path, here, depth)
                return self._sequence(node, path, here, depth)
            finally:
                self.active.discard(id(node))
        return _scalar(node)

    def _mapping(self, node: dict[Any, Any], path: Path, here: Pos, depth: int) -> dict[str, Any]:
        lc = _lc(node)
        out: dict[str, Any] = {}
        for key, value in _items(node):
            spot = lc.get(key)
            kpos, vpos = here, here
            if isinstance(spot, list) and len(spot) == 4:
                kpos = Pos(self.doc.file, spot[0] + 1, spot[1] + 1)
                # an empty (null) value has no token of its own: ruamel points past it
                vpos = kpos if value is None else Pos(self.doc.file, spot[2] + 1, spot[3] + 1)
            if not isinstance(key, str):
                self.problems.append(
                    Problem(kpos, f"field names must be strings, got {_key_text(key)}")
                )
                continue
            name = str(key)
            self.doc.index[(*path, name)] = NodePos(kpos, vpos)
            out[name] = self.plain(value, (*path, name), vpos, depth + 1)
        return out

    def _sequence(self, node: list[Any], path: Path, here: Pos, depth: int) -> list[Any]:
        lc = _lc(node)
        out: list[Any] = []
        for i, value in enumerate(node):
            spot = lc.get(i)
            vpos = here
            if isinstance(spot, list) and len(spot) >= 2:
                vpos = Pos(self.doc.file, spot[0] + 1, spot[1] + 1)
            self.doc.index[(*path, i)] = NodePos(None, vpos)
            out.append(self.plain(value, (*path, i), vpos, depth + 1))
        return out


def _items(node: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
    yield from node.items()


def _key_text(key: Any) -> str:
    if isinstance(key, dict | list | tuple):
        return "a complex key"
    return show(_scalar(key))


def _scalar(node: Any) -> Any:
    """ruamel's scalar subclasses (ScalarInt, ScalarFloat, LiteralScalarString...) to plain."""
    if node is None or type(node) in (str, int, float, bool):
        return node
    if isinstance(node, ScalarBoolean | bool):
        return bool(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, TaggedScalar):
        return _scalar(node.value)
    if isinstance(node, datetime.date | datetime.datetime):
        return node
    return node
