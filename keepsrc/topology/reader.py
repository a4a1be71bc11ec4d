"""Topology text -> one composed YAML node, or the finding that says why not.

Bounded before YAML sees anything: a file over the size limit is refused unread, and anchors and
aliases are refused when the composer meets the first one, before any node is shared. A topology
never needs them, and an alias of an alias of ... makes a few kilobytes stand for billions of nodes
to anyone who walks the tree.
"""

from __future__ import annotations

import os

import yaml
from yaml.nodes import Node, ScalarNode

from keepsrc.topology.diagnostics import Diagnostic

API_VERSION = "keepsrc/v1"
MAX_BYTES_DEFAULT = 64 * 1024 * 1024
MAX_BYTES_ENV = "KEEPSRC_MAX_TOPOLOGY_BYTES"
# Hints appended to PyYAML's own wording, keyed by a fragment of its problem or context text.
YAML_HINTS = {
    "'\\t'": "YAML indents with spaces, never tabs",
    "expected ',' or ']'": "is a ']' missing?",
    "expected ',' or '}'": "is a '}' missing?",
    "quoted scalar": "is a closing quote missing?",
    "mapping values are not allowed here": "quote a value that contains ': ', or check the indentation",
    "expected <block end>": "check the indentation",
    "another document": "a topology is one YAML document; remove the second '---'",
}
ANCHOR_WHY = "a topology never needs anchors/aliases; they can expand without limit; write the value out"


def max_bytes_limit(max_bytes: int | None) -> int:
    """`max_bytes` if given, else $KEEPSRC_MAX_TOPOLOGY_BYTES, else 64 MiB."""
    if max_bytes is not None:
        return max_bytes
    setting = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not setting:
        return MAX_BYTES_DEFAULT
    try:
        return int(setting)
    except ValueError:
        raise ValueError(f"{MAX_BYTES_ENV}={setting!r} is not a number of bytes") from None


def too_large(file: str, size: int, limit: int) -> Diagnostic:
    return Diagnostic(
        file, 1, 1, "",
        f"{file} is {size:,} bytes, over the limit of {limit:,} bytes; not read (a topology of 5,000"
        f" services is about 1.6 MB; raise the limit with {MAX_BYTES_ENV} or max_bytes= if this file is"
        " meant to be that large)",
    )


def utf8_size(text: str, limit: int) -> int:
    """The UTF-8 size of `text`, counted only when it could exceed `limit` (each character is 1-4 bytes)."""
    if len(text) * 4 <= limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class _AnchorRefused(yaml.MarkedYAMLError):
    pass


class _TopologyLoader(yaml.SafeLoader):
    """PyYAML's pure-Python loader, refusing the first anchor or alias as it composes."""

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AnchorRefused(problem=f"alias '*{event.anchor}' is not allowed", problem_mark=event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(problem=f"anchor '&{event.anchor}' is not allowed", problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def compose(text: str, file: str) -> tuple[Node | None, list[Diagnostic]]:
    """The document's root node, or None and the one finding (syntax, anchors, empty file)."""
    root = _compose_fast(text)
    if root is not None:
        return root, []
    try:
        loader = _TopologyLoader(text)  # the reader refuses non-printable characters right here
    except yaml.reader.ReaderError as exc:  # it has an offset, not a mark
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        message = f"YAML syntax error: non-printable character U+{exc.character:04X} is not allowed; remove it"
        return None, [Diagnostic(file, line, col, "", message)]
    try:
        root = loader.get_single_node()  # what yaml.compose() does, keeping the loader for its mark
    except _AnchorRefused as exc:
        mark = exc.problem_mark
        return None, [Diagnostic(file, mark.line + 1, mark.column + 1, "", f"YAML {exc.problem}: {ANCHOR_WHY}")]
    except yaml.MarkedYAMLError as exc:
        return None, [_syntax_error(file, exc)]
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        mark = loader.get_mark()
        message = "YAML syntax error: nested too deeply to read; a topology needs only a few levels"
        return None, [Diagnostic(file, mark.line + 1, mark.column + 1, "", message)]
    finally:
        loader.dispose()
    if root is None:
        message = f"empty file; a topology starts with 'apiVersion: {API_VERSION}'"
        return None, [Diagnostic(file, 1, 1, "", message)]
    return root, []


class _FastCLoader(yaml.CSafeLoader):
    """libyaml's composer with the resolver's per-node Python calls cut down: SafeLoader has no path
    resolvers, so descending and ascending do nothing, and a plain scalar's tag is looked up once per
    distinct text (the same few keys and values repeat thousands of times)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._plain_tags: dict[str, str] = {}  # bounded by the text being read

    def descend_resolver(self, parent: Node | None, index: object) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is not ScalarNode or not implicit[0]:
            return super().resolve(kind, value, implicit)
        tag = self._plain_tags.get(value)
        if tag is None:
            tag = self._plain_tags[value] = super().resolve(kind, value, implicit)
        return tag


def _compose_fast(text: str) -> Node | None:
    """libyaml's composer, ~7x faster on large files, for text that cannot hold an anchor or alias
    (libyaml would accept them, and it cannot be told not to). Anything else, or any trouble, goes
    to the pure-Python composer, which refuses anchors and has the precise messages."""
    if not yaml.__with_libyaml__ or "&" in text or "*" in text:
        return None
    try:
        return yaml.compose(text, Loader=_FastCLoader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None


def _syntax_error(file: str, exc: yaml.MarkedYAMLError) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        where = exc.context_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where and where is not mark else ""
        message += f" ({exc.context}{at})"
    hints = [hint for fragment, hint in YAML_HINTS.items() if fragment in f"{exc.problem} {exc.context}"]
    return Diagnostic(file, line, col, "", "; ".join([message, *hints]))
