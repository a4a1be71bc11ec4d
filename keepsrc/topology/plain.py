"""The plain pass: a topology read into plain values by yaml-rs and checked by the same schema,
without positions. On a valid file it is the whole load, ~2x faster than composing nodes; the first
finding, or anything it cannot be sure of, hands the file to the precise pass (reader.py), which
says where each finding is.

yaml-rs reads YAML 1.2 and PyYAML YAML 1.1, and the two differ on what some unquoted values are
(`on`, `017`, `1:20`). The pass only ever answers what the precise pass would answer, so it declines:
- text PyYAML reads differently or refuses and yaml-rs might not: anything not ASCII, control
  characters, tabs and carriage returns, anchors, aliases, tags, merge keys, directives, backslash
  escapes;
- text nested deep enough to exhaust yaml-rs's stack (it recurses per level, and crashes);
- a text value YAML 1.1 would read as another type, had it been unquoted (yaml-rs does not say
  whether it was);
- a number: any float, any integer when the file writes one in a form the two read apart
  (leading zero, 0o/0b, underscores), and any run of digits longer than a scalar may be.
tests/test_topology_fuzz.py checks on thousands of mutants that both passes accept the same files
as the same topology.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
import yaml_rs
from yaml.nodes import Node

from keepsrc.topology.checker import FLOAT_TAG, SCALAR_MAX, Checker, Keys, is_name

T = TypeVar("T")

# Printable ASCII and line feeds, less what the pass declines: anchors (&), aliases (*), tags (!),
# escapes (\), directives (%), merge keys (<<) and carriage returns; `translate` deletes these from
# the text, and anything left is declined. A topology rarely holds any of them.
_PLAIN_ASCII = bytes(range(0x20, 0x7F)).translate(None, b"&*!\\%<") + b"\n"
# A line starting with this many spaces or block indicators: a block nested deeper than a topology
# ever is, and well short of the depth that overflows yaml-rs's stack (~10,000 levels, in tests).
_DEEP_INDENT_RE = re.compile(r"[ ?:-]{200}")
_DEEP_LINE_RE = re.compile(r"\n[ ?:-]{200}")
# An integer YAML 1.1 and 1.2 read apart: a leading zero (octal in 1.1), 0o, 0b, or underscores.
_INT_FORMS_APART_RE = re.compile(r"[\s\[{,:?][-+]?(?:0[0-9oObB_]|[0-9]+_)")
# Larger than any integer a topology holds; Python refuses to print an int of over 4,300 digits.
_INT_BOUND = 2**64
# yaml-rs turns a run of digits into an int in time quadratic in its length (a million digits:
# 0.8 s), so a text with any run of digits (or hex digits) longer than a scalar may be is declined:
# the precise pass refuses such a value unread (SCALAR_MAX). With every digit mapped to "0", a run
# is a substring search, which skips through the text.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789abcdefABCDEF_", b"0" * 23)
_LONG_DIGIT_RUN = b"0" * (SCALAR_MAX + 1)
# Every value YAML 1.1 reads as something other than text when unquoted (PyYAML's implicit resolvers).
_YAML11_NOT_TEXT_RE = re.compile(
    "|".join(
        sorted(
            {
                f"(?:{regexp.pattern})"
                for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values()
                for _, regexp in resolvers
            }
        )
    ),
    re.X,
)
_YAML11_FLOAT_RE = next(
    regexp
    for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values()
    for tag, regexp in resolvers
    if tag == FLOAT_TAG
)


class NeedsPositions(Exception):
    """The plain pass met a finding, or a value it cannot be sure of: the precise pass decides."""


def read_plain(text: str) -> Any:
    """The document as plain values, or None where only the precise pass can read it (see above)."""
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if data.translate(None, _PLAIN_ASCII) or _LONG_DIGIT_RUN in data.translate(_DIGITS_AS_ZERO):
        return None
    if _DEEP_INDENT_RE.match(text) or _DEEP_LINE_RE.search(text):
        return None
    try:
        return yaml_rs.loads(text, parse_datetime=False)
    except Exception:  # a syntax error (or any failure of its own): the precise pass words it
        return None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # a panic in Rust is pyo3's, a BaseException
            raise
        return None


class PlainChecker(Checker):
    """Checker's primitives on plain values; every finding ends the pass (see NeedsPositions)."""

    def __init__(self, file: str, text: str) -> None:
        super().__init__(file)
        self.text = text
        self.is_text: dict[str, bool] = {}  # value -> YAML 1.1 reads it as text; bounded by the file
        self.integers_read_alike: bool | None = None  # decided when the first integer is met

    def report(self, node: Node, path: str, message: str, severity: object = None) -> None:
        raise NeedsPositions

    def show(self, node: Node) -> str:
        raise NeedsPositions

    def line(self, node: Node) -> int:
        raise NeedsPositions

    def mapping(self, node: Node, path: str, allowed: list[str], required: dict[str, str] | None = None) -> Keys:
        if type(node) is not dict:
            raise NeedsPositions
        return self.keys(node, path, allowed, required)

    def keys(self, node: Any, path: str, allowed: list[str], required: dict[str, str] | None = None) -> Keys:
        for key in node:  # yaml-rs refuses duplicate keys itself
            if key not in allowed:
                raise NeedsPositions
        if required and not required.keys() <= node.keys():
            raise NeedsPositions
        return {key: (key, value) for key, value in node.items()}

    def named_mapping(self, node: Node, path: str, what: str) -> list[tuple[str, Any]]:
        if type(node) is not dict:
            raise NeedsPositions
        for name in node:
            if type(name) is not str or not is_name(name):
                raise NeedsPositions
        return list(node.items())

    def sequence(self, node: Node, path: str, what: str) -> Any:
        if type(node) is not list:
            raise NeedsPositions
        return node

    def is_mapping(self, node: Node) -> bool:
        return type(node) is dict

    def value_at(self, node: Node, key: str) -> Any:
        return node.get(key) if type(node) is dict else None

    def joined_texts(self, items: list[Any]) -> str | None:
        """The items joined when all are text as yaml-rs read them, which YAML 1.1 may read as another
        type (`1:20`); the one caller takes only lists of ip:port, which YAML 1.1 reads as text too."""
        try:
            return "\n".join(items)
        except TypeError:  # an item is not text
            return None

    def scalar_value(self, node: Any) -> Any:
        return self.construct(node)

    def choice_as_written(self, node: Any, path: str, enum: Callable[[str], T], options: list[str]) -> T | None:
        # Text YAML 1.1 reads as a float ("1.3": yaml-rs gives text for it only when quoted) is the
        # same text to the precise pass either way. A float is declined: its written text decides.
        if type(node) is str and node in options and _YAML11_FLOAT_RE.fullmatch(node):
            return enum(node)
        return self.choice(node, path, enum, options)

    def construct(self, node: Any) -> Any:
        kind = type(node)
        if kind is str:
            is_text = self.is_text.get(node)
            if is_text is None:
                is_text = len(node) <= SCALAR_MAX and _YAML11_NOT_TEXT_RE.fullmatch(node) is None
                self.is_text[node] = is_text
            if is_text:
                return node
        elif kind is bool or node is None:
            return node
        elif kind is int and -_INT_BOUND < node < _INT_BOUND:  # past it: the precise pass has SCALAR_MAX
            if self.integers_read_alike is None:
                self.integers_read_alike = _INT_FORMS_APART_RE.search(self.text) is None
            if self.integers_read_alike:
                return node
        raise NeedsPositions

    def scalar(self, node: Node, path: str, kind: type, what: str) -> Any:
        value = self.construct(node)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise NeedsPositions
