"""Read YAML into plain Python values plus a position index, so later errors can name file:line:col.

ruamel's round-trip loader records `.lc` positions on mappings and sequences. We copy the document
into plain dict/list/str/int/float/bool/None (pydantic then sees ordinary data) and keep a side
index from each value's path, e.g. `("spec", "egress", 0, "destination")`, to where its key and
value start. Anything ruamel or our walk rejects becomes a `Problem`, never an exception.

ruamel is pure Python and slow (about 5 ms for a 1 kB file), so ordinary files are read from
libyaml's event stream instead (PyYAML's C binding) when it is installed. That fast path keeps
ruamel's semantics, YAML 1.2: plain scalars are resolved with ruamel's own 1.2 resolver table and
non-strings built by ruamel's own constructors. Whatever it does not handle the same way by
construction -- any libyaml error, anchors and aliases, tags, directives, merge keys, duplicate or
non-string keys, timestamps, block scalars (`|`, `>`: the two disagree on some of their edge
cases), tabs and unusual line breaks, very deep or large documents -- makes the whole file go
through ruamel, so every message and position is what ruamel gives.
"""

from __future__ import annotations

import datetime
import importlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import implicit_resolvers
from ruamel.yaml.scalarbool import ScalarBoolean

from meshgate.policy.problems import Pos, Problem, show

PathItem = str | int
Path = tuple[PathItem, ...]

MAX_NODES = 100_000  # alias bombs expand beyond this; real policies are far smaller
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
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
    if _LIBYAML is not None:
        try:
            return _parse_libyaml(file, text), []
        except Exception:  # _Fallback, a libyaml error, or anything unexpected: ruamel decides
            pass
    return parse_documents_ruamel(file, text)


def parse_documents_ruamel(file: str, text: str) -> tuple[list[YamlDoc], list[Problem]]:
    """`parse_documents` with ruamel only: the reference behaviour, and what errors go through."""
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


# --------------------------------------------------------------------------- libyaml fast path


def _libyaml() -> Any:
    """PyYAML, if it is installed with its libyaml binding; imported by name so that neither it
    nor its type stubs are needed."""
    try:
        yaml = importlib.import_module("yaml")
        importlib.import_module("yaml.events")
    except ImportError:
        return None
    return yaml if getattr(yaml, "__with_libyaml__", False) else None


_LIBYAML = _libyaml()

# Text the fast path leaves to ruamel: tabs, line breaks other than \n (libyaml and ruamel count
# lines and handle tabs differently enough not to risk), a byte order mark, directives.
_RUAMEL_ONLY_TEXT = re.compile("[\t\r\x85\u2028\u2029\ufeff]|^%", re.MULTILINE)

_TAG = "tag:yaml.org,2002:"
_STR, _NULL = _TAG + "str", _TAG + "null"
_CONSTRUCTED = frozenset(_TAG + t for t in ("null", "bool", "int", "float"))
_QUOTED_STYLES = frozenset(["'", '"'])  # block scalars (| and >) are left to ruamel


class _Fallback(Exception):
    """The fast path cannot vouch for giving what ruamel gives: parse with ruamel."""


def _resolvers_1_2() -> dict[str, list[tuple[str, Any]]]:
    """ruamel's implicit resolvers for YAML 1.2, by first character, in ruamel's order."""
    table: dict[str, list[tuple[str, Any]]] = {}
    for versions, tag, regexp, first in implicit_resolvers:
        if (1, 2) in versions:
            for ch in first:
                table.setdefault(ch, []).append((tag, regexp))
    return table


_RESOLVERS = _resolvers_1_2()
_scalar_lock = threading.Lock()
_scalar_values: dict[tuple[str, str], Any] = {}
_constructor: Any = None


def _resolve(value: str) -> str:
    """The tag ruamel's VersionedResolver gives a plain scalar under YAML 1.2."""
    for tag, regexp in _RESOLVERS.get(value[:1], ()):
        if regexp.match(value):
            return tag
    return _STR


def _plain(value: str) -> Any:
    """A plain (unquoted, untagged) scalar as ruamel loads it under YAML 1.2, made plain."""
    tag = _resolve(value)
    if tag == _STR:
        return value
    if tag not in _CONSTRUCTED:
        raise _Fallback  # timestamps, merge keys, "=": rare, and not plain data
    if tag == _NULL:
        return None
    return _construct(tag, value)


def _construct(tag: str, value: str) -> Any:
    """Build an int, float or bool with ruamel's own constructor (so `0o17`, `1_000`, `.inf`, or
    ruamel's errors on `0x_`, are exactly ruamel's), cached: policies repeat their numbers."""
    key = (tag, value)
    try:
        return _scalar_values[key]
    except KeyError:
        pass
    global _constructor
    with _scalar_lock:
        if _constructor is None:
            _constructor = YAML(typ="rt").constructor
        build: Callable[[Any, Any], Any] = _constructor.yaml_constructors[tag]
        result = _scalar(build(_constructor, ScalarNode(tag, value, style=None)))
        if type(result) not in (int, float, bool):
            raise _Fallback
        if len(_scalar_values) >= 10_000:
            _scalar_values.clear()
        _scalar_values[key] = result
    return result


def _parse_libyaml(file: str, text: str) -> list[YamlDoc]:
    """Every document of `text` via libyaml's events, or _Fallback / a libyaml error."""
    if _RUAMEL_ONLY_TEXT.search(text):
        raise _Fallback
    loader = _LIBYAML.CSafeLoader(text)
    try:
        return _EventReader(file, loader.get_event).documents()
    finally:
        loader.dispose()


class _EventReader:
    """Build YamlDocs from a libyaml event stream, exactly as ruamel's load plus `_Walker`."""

    def __init__(self, file: str, get_event: Callable[[], Any]) -> None:
        ev = _LIBYAML.events
        self.file = file
        self.get = get_event
        self.scalar_event = ev.ScalarEvent
        self.mapping_start = ev.MappingStartEvent
        self.mapping_end = ev.MappingEndEvent
        self.sequence_start = ev.SequenceStartEvent
        self.sequence_end = ev.SequenceEndEvent
        self.index: dict[Path, NodePos] = {}
        self.count = 0

    def documents(self) -> list[YamlDoc]:
        ev = _LIBYAML.events
        get = self.get
        if not isinstance(get(), ev.StreamStartEvent):
            raise _Fallback
        docs: list[YamlDoc] = []
        while True:
            event = get()
            if isinstance(event, ev.StreamEndEvent):
                return docs
            if not isinstance(event, ev.DocumentStartEvent):
                raise _Fallback
            if event.version is not None or event.tags:
                raise _Fallback  # %YAML 1.1 switches ruamel's resolver; %TAG names tags
            root = get()
            mark = root.start_mark
            start = Pos(self.file, mark.line + 1, mark.column + 1)
            self.index = {(): NodePos(None, start)}
            self.count = 0
            data = self.node(root, (), 0)
            if not isinstance(get(), ev.DocumentEndEvent):
                raise _Fallback
            if data is not None:  # an empty document, e.g. a trailing `---` or only comments
                docs.append(YamlDoc(file=self.file, data=data, start=start, index=self.index))

    def node(self, event: Any, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _Fallback
        if event.anchor is not None or event.tag is not None:
            raise _Fallback  # aliases reach here too (they have an anchor and no tag)
        kind = type(event)
        if kind is self.scalar_event:
            return self.value(event)
        if depth > MAX_DEPTH:
            raise _Fallback
        if kind is self.mapping_start:
            return self.mapping(path, depth)
        if kind is self.sequence_start:
            return self.sequence(path, depth)
        raise _Fallback

    @staticmethod
    def value(event: Any) -> Any:
        style = event.style
        if not style:
            return _plain(event.value)
        if style not in _QUOTED_STYLES:
            raise _Fallback
        return event.value

    def mapping(self, path: Path, depth: int) -> dict[str, Any]:
        file, get, index = self.file, self.get, self.index
        out: dict[str, Any] = {}
        while True:
            event = get()
            kind = type(event)
            if kind is self.mapping_end:
                return out
            if kind is not self.scalar_event or event.anchor is not None or event.tag is not None:
                raise _Fallback  # a complex key, an alias or a tagged key
            key = self.value(event)
            if type(key) is not str or key in out:
                raise _Fallback  # ruamel reports these (non-string and duplicate keys)
            mark = event.start_mark
            kpos = Pos(file, mark.line + 1, mark.column + 1)
            event = get()
            item = (*path, key)
            value = self.node(event, item, depth + 1)
            if value is None:  # an empty (null) value has no token of its own
                index[item] = NodePos(kpos, kpos)
            else:
                mark = event.start_mark
                index[item] = NodePos(kpos, Pos(file, mark.line + 1, mark.column + 1))
            out[key] = value

    def sequence(self, path: Path, depth: int) -> list[Any]:
        file, get, index = self.file, self.get, self.index
        out: list[Any] = []
        while True:
            event = get()
            if type(event) is self.sequence_end:
                return out
            item = (*path, len(out))
            mark = event.start_mark
            index[item] = NodePos(None, Pos(file, mark.line + 1, mark.column + 1))
            out.append(self.node(event, item, depth + 1))
