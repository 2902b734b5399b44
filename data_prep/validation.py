"""Bad-input policy: every skipped record is counted under one reason; `--strict` fails on the first.

Reasons:
    invalid_json   a JSON line / file that does not parse
    missing_field  a record without the text field (or a null value, or a record that is not an object)
    not_string     the text field holds a number, list, ...
    non_utf8       bytes that are not valid UTF-8 (or lone surrogates from JSON escapes)
    empty          nothing but whitespace
    binary         NUL bytes or more than 1% control characters
    too_large      a document above `--max-document-bytes` (keeps memory bounded)
    unreadable     a file that cannot be opened or decompressed (e.g. a truncated .gz); the records
                   read before the failure are kept
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class SkipReason(StrEnum):
    """Why a record was skipped (the module docstring says when each applies); equal to its name string."""

    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    NOT_STRING = "not_string"
    NON_UTF8 = "non_utf8"
    EMPTY = "empty"
    BINARY = "binary"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"


REASONS = tuple(SkipReason)
MAX_EXAMPLES = 3
"""Locations kept per source and reason for the report."""

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # keeps \t \n \v \f \r
_BINARY_CONTROL_FRACTION = 0.01


class DataError(ValueError):
    """A bad input record in `--strict` mode; the message names the file and line (or record)."""


def text_problem(text: str) -> SkipReason | None:
    """The reason to skip an already-decoded document, or None when it is fine."""
    if not text or text.isspace():
        return SkipReason.EMPTY
    if "\x00" in text:
        return SkipReason.BINARY
    controls = len(_CONTROL.findall(text))
    if controls and controls > _BINARY_CONTROL_FRACTION * len(text):
        return SkipReason.BINARY
    return None


@dataclass
class SourceStats:
    """Counts for one input source (mergeable; JSON-serialisable through `to_dict`)."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, location: str) -> None:
        assert reason in REASONS, reason
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(location)

    def merge(self, other: SourceStats) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.skipped.update(other.skipped)
        for reason, locs in other.examples.items():
            ex = self.examples.setdefault(reason, [])
            ex.extend(locs[: MAX_EXAMPLES - len(ex)])

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
            "examples": {r: self.examples[r] for r in REASONS if r in self.examples},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SourceStats:
        return cls(d["documents"], d["tokens"], d["bytes"], Counter(d["skipped"]),
                   {k: list(v) for k, v in d["examples"].items()})


def merge_stats(into: dict[str, SourceStats], delta: dict[str, SourceStats]) -> None:
    """Add per-source `delta` into `into` in place."""
    for name, s in delta.items():
        into.setdefault(name, SourceStats()).merge(s)


def total_skipped(stats: dict[str, SourceStats]) -> dict[str, int]:
    total: Counter = Counter()
    for s in stats.values():
        total.update(s.skipped)
    return {r: total[r] for r in REASONS if total[r]}
