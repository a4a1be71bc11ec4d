"""Findings about a topology file, each pointing at file:line:col and a key path."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


def printable(text: str) -> str:
    """`text` with every non-printable character (line breaks, tabs, control codes) escaped as repr
    does, so that one finding is always one line of output, starting with file:line:col."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    path: str  # key path such as proxies.ingress.listeners[0].protocol
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        # Messages already quote the file's text escaped; this also covers a file name or a YAML
        # error text that carries a control character.
        where = f"{printable(self.path)}: " if self.path else ""
        return f"{printable(self.file)}:{self.line}:{self.col}: {self.severity}: {where}{printable(self.message)}"


class TopologyError(Exception):
    """A topology that cannot be served; carries every error found in one pass."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]
