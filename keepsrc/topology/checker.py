"""Generic checks on composed YAML nodes, each finding reported at its node's line and column.

Nothing here knows the topology schema (that is loader.py and tls_schema.py); these are the
primitives it is built from: mappings with known keys, lists, typed scalars, names, enumerations
and durations. Every check costs time proportional to the node it looks at, so validating a file
is linear in its size: the error count is a counter, "did you mean" has a fixed budget, and
anything quoted back from the file is cut to a fixed length and escaped. plain.py has the same
primitives on plain values, for the plain pass.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keepsrc.topology.diagnostics import Diagnostic, Severity

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A DNS label: 1-63 letters, digits and '-', not starting or ending with '-' (RFC 1035).
DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A file Envoy opens (an access log, a PEM file): Linux's PATH_MAX (4096 with its NUL) and
# NAME_MAX (255 bytes a component).
PATH_MAX_BYTES = 4095
FILE_NAME_MAX_BYTES = 255
# Envoy 1.40 takes far longer names (a stat name segment may be 64 KiB), but every name is repeated
# in each stat, log line and config dump of its resource; 255 is the longest a file name may be too.
NAME_MAX = 255
NAME_RULE = f"letters, digits, '_', '.', '-', starting with a letter or digit; at most {NAME_MAX}"
DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)")
DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000}
DURATION_RULE = "a positive number with unit ms, s or m, e.g. 250ms, 1s, 1.5s, 5m"
# Envoy converts durations to int64 nanoseconds and refuses any from 9,223,372,036s on (checked
# against Envoy 1.40's --mode validate: 9223372035.999s is accepted, 9223372036s refused).
DURATION_MAX_S = 9_223_372_035
DURATION_MAX_MS = DURATION_MAX_S * 1000 + 999
# No scalar keepsrc reads is longer (the longest is an access-log path, PATH_MAX 4096 with its NUL).
# The cap keeps a pathological value (a million-digit number, a megabyte of name) from costing more
# than reading it: it is refused before YAML's constructors or any regular expression see it.
SCALAR_MAX = 4096
# How much of a value from the file a message quotes.
QUOTE_MAX = 80
# "did you mean" compares a word with at most 4 * SUGGEST_WINDOW options (see Suggestions), and one
# file with at most SUGGEST_BUDGET in all: a file of a million distinct unknown names gets suggestions
# for the first thousands only (later findings list the valid options without one).
SUGGEST_WINDOW = 50
SUGGEST_BUDGET = 200_000
SUGGEST_WORD_MAX = 100
# A message lists at most this many valid options (a file may define thousands of services).
LISTING_MAX = 12

T = TypeVar("T")
Keys = dict[str, tuple[Node, Node]]
Parsers = dict[str, tuple[str, Callable[[Node, str], Any]]]  # key -> (model field, parser of its value)
STR_TAG = "tag:yaml.org,2002:str"
FLOAT_TAG = "tag:yaml.org,2002:float"
UNREADABLE = object()  # a scalar whose explicit tag could not construct it (e.g. `!!int abc`)


def quoted(text: str) -> str:
    """`text` from the file, for a message: repr-escaped, so that no control character or line break
    reaches the output, and cut to QUOTE_MAX characters."""
    if len(text) > QUOTE_MAX:
        return repr(text[:QUOTE_MAX]) + f"... ({len(text):,} characters)"
    return repr(text)


def join(path: str, key: str) -> str:
    """The key path of `key` under `path`; a key that is not plain text is shown quoted."""
    if not key.isprintable() or len(key) > QUOTE_MAX or not key:
        return f"{path}[{quoted(key)}]"
    return f"{path}.{key}" if path else key


def listing(options: Collection[str]) -> str:
    if len(options) <= LISTING_MAX:
        return ", ".join(options)
    shown = itertools.islice(options, LISTING_MAX)
    return ", ".join(shown) + f", ... ({len(options):,} in all)"


def suggest(option: str) -> str:
    return f" (did you mean '{option}'?)" if option else ""


class Suggestions:
    """'did you mean' against one list of options: the closest, ignoring case ('TCP' -> 'tcp').

    A word is compared with at most 4 * SUGGEST_WINDOW options: its neighbours in sorted order, and
    in sorted order of the reversed strings (a typo near the start of a word keeps its end). With
    thousands of defined names that finds the likely ones, at a cost that does not grow with them.
    """

    def __init__(self, options: Iterable[str]) -> None:
        self.by_lower = {option.lower(): option for option in options}
        self.forward = sorted(self.by_lower)
        self.backward = sorted(option[::-1] for option in self.by_lower)
        self.cache: dict[str, str] = {}  # a misspelt name repeated 20,000 times is compared once

    def candidates(self, word: str) -> list[str]:
        if len(self.forward) <= 4 * SUGGEST_WINDOW:
            return self.forward
        i = bisect.bisect(self.forward, word)
        j = bisect.bisect(self.backward, word[::-1])
        near = self.forward[max(0, i - SUGGEST_WINDOW) : i + SUGGEST_WINDOW]
        near_end = [option[::-1] for option in self.backward[max(0, j - SUGGEST_WINDOW) : j + SUGGEST_WINDOW]]
        return list(dict.fromkeys(near + near_end))


class Checker:
    """Walks composed YAML nodes, collecting diagnostics; subclassed by the schema (loader.py)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.diagnostics: list[Diagnostic] = []
        self.errors = 0
        # Per check, not per module: SafeConstructor caches every node it constructs and is not thread-safe.
        self.constructor = yaml.constructor.SafeConstructor()
        # Key paths an unknown key was already reported as a likely typo of ("did you mean"), so that
        # the same typo is not reported a second time as that key missing.
        self.suggested: set[str] = set()
        self.suggest_budget = SUGGEST_BUDGET

    # -- reporting -------------------------------------------------------------------------
    def report(self, node: Node, path: str, message: str, severity: Severity = Severity.ERROR) -> None:
        mark = node.start_mark
        self.diagnostics.append(Diagnostic(self.file, mark.line + 1, mark.column + 1, path, message, severity))
        if severity is Severity.ERROR:
            self.errors += 1

    def missing(self, node: Node, path: str, message: str) -> None:
        if path not in self.suggested:
            self.report(node, path, message)

    def did_you_mean(self, word: str, options: Suggestions | list[str]) -> str:
        """The closest option to `word`, or '' when none is close or the file spent its budget."""
        if not isinstance(options, Suggestions):
            options = Suggestions(options)  # a short fixed list of keys or values
        lower = word.lower()
        if lower in options.cache:
            return options.cache[lower]
        if len(word) > SUGGEST_WORD_MAX:
            return ""
        candidates = options.candidates(lower)
        if len(candidates) > self.suggest_budget:
            return ""
        self.suggest_budget -= len(candidates)
        close = difflib.get_close_matches(lower, candidates, n=1, cutoff=0.6)
        options.cache[lower] = options.by_lower[close[0]] if close else ""
        return options.cache[lower]

    # -- structure -------------------------------------------------------------------------
    def mapping(self, node: Node, path: str, allowed: list[str], required: dict[str, str] | None = None) -> Keys | None:
        """Keys of a mapping node -> (key node, value node); None after reporting a non-mapping."""
        if not isinstance(node, MappingNode):
            expected = f"expected a mapping with keys {listing(allowed)}"
            self.report(node, path, f"{expected}, got {self.show(node)}")
            return None
        return self.keys(node, path, allowed, required)

    def keys(self, node: MappingNode, path: str, allowed: list[str], required: dict[str, str] | None = None) -> Keys:
        """Reports unknown, duplicate and missing keys; `required` maps each required key to what it holds."""
        out: Keys = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, f"keys must be plain strings, got {self.show(key_node)}")
                continue
            key = key_node.value
            if key in allowed and key not in out:
                out[key] = (key_node, value_node)
            elif key == "<<":
                self.report(key_node, join(path, key), "YAML merge keys ('<<') are not supported; write the keys out")
            elif key not in allowed:
                hint = self.did_you_mean(key, allowed)
                if hint:
                    self.suggested.add(join(path, hint))
                valid = listing(allowed)
                self.report(key_node, join(path, key), f"unknown key {quoted(key)}{suggest(hint)}; valid keys: {valid}")
            else:
                first = out[key][0].start_mark.line + 1
                self.report(key_node, join(path, key), f"duplicate key '{key}' (first on line {first}); keep one")
        for key, holds in (required or {}).items():
            if key not in out:
                self.missing(node, join(path, key), f"missing required key '{key}': {holds}")
        return out

    def fields(self, keys: Keys, path: str, parsers: Parsers) -> dict[str, Any]:
        """Model field -> value, for each key present that has a parser; None where it was reported."""
        out = {}
        for key, (_, value) in keys.items():
            if key in parsers:
                field, parse = parsers[key]
                out[field] = parse(value, f"{path}.{key}")
        return out

    def named_mapping(self, node: Node, path: str, what: str) -> list[tuple[str, Node]]:
        """A mapping whose keys are user-chosen names (services, proxies): [(name, value node)]."""
        if not isinstance(node, MappingNode):
            self.report(node, path, f"expected a mapping of {what}, got {self.show(node)}")
            return []
        seen: dict[str, int] = {}
        out = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, f"a name must be a plain string, got {self.show(key_node)}")
                continue
            name = key_node.value
            key_path = join(path, name)
            if not is_name(name):
                self.report(key_node, key_path, f"invalid name {quoted(name)}; valid: {NAME_RULE}")
            elif name in seen:
                first = seen[name]
                self.report(key_node, key_path, f"duplicate name '{name}' (first on line {first}); keep one")
            else:
                seen[name] = key_node.start_mark.line + 1
                out.append((name, value_node))
        return out

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        """The items of a list node; None after reporting a non-list. `what` describes a valid list."""
        if not isinstance(node, SequenceNode):
            self.report(node, path, f"expected {what}, got {self.show(node)}")
            return None
        return list(node.value)

    # -- what the schema reads of a node besides the checks --------------------------------
    def is_mapping(self, node: Node) -> bool:
        return isinstance(node, MappingNode)

    def line(self, node: Node) -> int:
        return node.start_mark.line + 1  # type: ignore[no-any-return]

    def value_at(self, node: Node, key: str) -> Node | None:
        """The value of `key` in a mapping node, or None."""
        if isinstance(node, MappingNode):
            return next((value for key_node, value in node.value if key_node.value == key), None)
        return None

    def joined_texts(self, items: list[Node]) -> str | None:
        """The items' text joined by line breaks, when each is a text scalar; None when any is not."""
        texts = [item.value for item in items if type(item) is ScalarNode and item.tag == STR_TAG]
        return "\n".join(texts) if len(texts) == len(items) else None

    def scalar_value(self, node: Node) -> Any:
        """What a scalar node holds (see construct); None for a mapping or a list."""
        return self.construct(node) if isinstance(node, ScalarNode) else None

    def choice_as_written(self, node: Node, path: str, enum: Callable[[str], T], options: list[str]) -> T | None:
        """`choice`, where a number written unquoted (`min_version: 1.2`) counts as the text written."""
        if isinstance(node, ScalarNode) and node.tag == FLOAT_TAG:
            node = ScalarNode(STR_TAG, node.value, node.start_mark, node.end_mark)
        return self.choice(node, path, enum, options)

    def non_empty_sequence(self, node: Node, path: str, what: str, if_empty: str) -> list[Node] | None:
        """The items of a list node that must hold at least one; None after reporting either.
        `if_empty` says why an empty list is wrong and what to write instead."""
        items = self.sequence(node, path, what)
        if items is not None and not items:
            self.report(node, path, if_empty)
            return None
        return items

    # -- scalars ---------------------------------------------------------------------------
    def construct(self, node: ScalarNode) -> Any:
        if len(node.value) > SCALAR_MAX:
            return UNREADABLE
        if node.tag == STR_TAG:  # what SafeConstructor makes of it, without its per-node bookkeeping
            return node.value
        try:
            return self.constructor.construct_object(node)
        # An explicit tag (`!!int abc`, `!!timestamp x`, `!custom`) runs that tag's constructor on
        # arbitrary text, and each fails in its own way; the finding is the same for all of them.
        except Exception:
            return UNREADABLE

    def show(self, node: Node) -> str:
        """A node as the user wrote it, for "got ..." in messages."""
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        if len(node.value) > SCALAR_MAX:
            return f"a value of {len(node.value):,} characters (at most {SCALAR_MAX:,}): {quoted(node.value)}"
        value = self.construct(node)
        if value is UNREADABLE:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            return f"{quoted(node.value)} with tag {quoted(tag)[1:-1]}, which keepsrc cannot read; remove the tag"
        if value is None:
            return "an empty value"
        if isinstance(value, str):
            return quoted(value)
        # As written, plus what YAML made of it: `no` is a boolean and `2001-12-14` a date, not text.
        kind = {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
        return f"{quoted(node.value)[1:-1]} ({kind})"

    def scalar(self, node: Node, path: str, kind: type, what: str) -> Any:
        """The node's value if it is a scalar of `kind`; reports and returns None otherwise."""
        if isinstance(node, ScalarNode):
            value = self.construct(node)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
        self.report(node, path, f"expected {what}, got {self.show(node)}")
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        return self.scalar(node, path, bool, "true or false")

    def switch(self, node: Node, path: str, allowed: list[str]) -> bool | None:
        """The `true`/`false` form of a key that also takes a mapping of settings."""
        return self.scalar(node, path, bool, f"true, false or a mapping with keys {listing(allowed)}")

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node, path, int, f"an integer from {lo} to {hi}")
        if value is not None and not lo <= value <= hi:
            self.report(node, path, f"{self.number_shown(node, value)} is out of range; valid: {lo} to {hi}")
            return None
        return value

    def number_shown(self, node: Node, value: int) -> str:
        """An integer for a message: its digits, or as written when it is too long for Python to print
        (4,300 digits: `0x` and 4,000 hex digits is a 4,816-digit number)."""
        return str(value) if value.bit_length() <= 64 else quoted(node.value)

    def name(self, node: Node, path: str) -> str | None:
        value = self.scalar(node, path, str, f"a name ({NAME_RULE})")
        if value is not None and not is_name(value):
            self.report(node, path, f"invalid name {quoted(value)}; valid: {NAME_RULE}")
            return None
        return value

    def choice(self, node: Node, path: str, enum: Callable[[str], T], options: list[str]) -> T | None:
        value = self.scalar(node, path, str, f"one of {listing(options)}")
        if value is None:
            return None
        if value not in options:
            hint = suggest(self.did_you_mean(value, options))
            self.report(node, path, f"{quoted(value)} is not valid{hint}; valid: {listing(options)}")
            return None
        return enum(value)

    def duration_ms(self, node: Node, path: str) -> int | None:
        value = self.scalar(node, path, str, DURATION_RULE)
        if value is None:
            return None
        match = DURATION_RE.fullmatch(value)
        # Below 1ms the millisecond model rounds to 0, which Envoy rejects for every timeout here.
        ms = float(match.group(1)) * DURATION_UNITS_MS[match.group(2)] if match else 0
        if ms < 1:
            self.report(node, path, f"{quoted(value)} is not a duration of at least 1ms; valid: {DURATION_RULE}")
            return None
        if ms > DURATION_MAX_MS:
            self.report(
                node, path,
                f"{quoted(value)} is longer than Envoy accepts (it counts durations in 64-bit nanoseconds);"
                f" valid: at most {DURATION_MAX_S}s",
            )
            return None
        return int(ms)


def is_name(text: str) -> bool:
    return len(text) <= NAME_MAX and NAME_RE.fullmatch(text) is not None


def file_path_problem(target: str) -> str:
    """Why Envoy could not open `target` as a file, or ''."""
    if not target.isprintable():
        return "contains a control character"
    try:
        size = len(target.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: no file name has one
        return "is not valid Unicode"
    if size > PATH_MAX_BYTES:
        return f"is {size:,} bytes long; a path has at most {PATH_MAX_BYTES:,}"
    components = target.split("/")
    if any(len(c.encode("utf-8")) > FILE_NAME_MAX_BYTES for c in components):
        return f"has a directory or file name over {FILE_NAME_MAX_BYTES} bytes, which no Linux file system allows"
    if components[-1] in ("", ".", ".."):
        return "names a directory, not a file"
    return ""
