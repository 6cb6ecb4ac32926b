"""Scanning a JSON object that may still be arriving, one top-level key at a time.

Owns `scan_object`: given text that starts with `{`, it reports where the object ends (or that
it has not ended yet), the top-level keys seen so far and the character span of each key's
value — complete, or still open at the end of the text. Streamed tool calls need this: the
function name is known as soon as its string closes, and the arguments can be forwarded while
they are still being generated. It checks structure (quotes, escapes, nesting, `:` and `,`
between members), not the full JSON grammar: a complete object is validated with `json.loads`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"


@dataclass
class ObjectScan:
    """What is known about an object starting at `start`.

    end: index just past the closing `}`, None while the object is still open.
    values: key -> (value_start, value_end); value_end is None while that value is still open.
    broken: the text cannot be (the start of) a JSON object.
    """

    start: int
    end: int | None = None
    keys: list[str] = field(default_factory=list)
    values: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    broken: bool = False

    @property
    def complete(self) -> bool:
        return self.end is not None and not self.broken


def skip_ws(text: str, pos: int, extra: str = "") -> int:
    while pos < len(text) and (text[pos] in WHITESPACE or text[pos] in extra):
        pos += 1
    return pos


def _string_end(text: str, pos: int) -> int | None:
    """Index just past the string that opens at text[pos] == '"'; None if it is not closed yet."""
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    return None


def _value_end(text: str, pos: int) -> tuple[int | None, bool]:
    """(end of the value starting at pos, broken). The value ends before the `,` or `}` that
    follows it at nesting level 0; None if the text ends first."""
    depth = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = _string_end(text, i)
            if end is None:
                return None, False
            i = end
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            if depth == 0:
                return (i, False) if ch == "}" else (None, True)
            depth -= 1
        elif ch == "," and depth == 0:
            return i, False
        i += 1
    return None, False


def scan_object(text: str, start: int) -> ObjectScan:
    """Scan the object opening at text[start] == '{' (see ObjectScan)."""
    scan = ObjectScan(start)
    pos = skip_ws(text, start + 1)
    if pos < len(text) and text[pos] == "}":
        scan.end = pos + 1
        return scan
    while pos < len(text):
        if text[pos] != '"':
            scan.broken = True
            return scan
        key_end = _string_end(text, pos)
        if key_end is None:
            return scan
        try:
            key = json.loads(text[pos:key_end])
        except ValueError:
            scan.broken = True
            return scan
        pos = skip_ws(text, key_end)
        if pos >= len(text):
            return scan
        if text[pos] != ":":
            scan.broken = True
            return scan
        value_start = skip_ws(text, pos + 1)
        scan.keys.append(key)
        if value_start >= len(text):
            scan.values[key] = (value_start, None)
            return scan
        stop, broken = _value_end(text, value_start)
        if broken:
            scan.broken = True
            return scan
        if stop is None:
            scan.values[key] = (value_start, None)
            return scan
        value_end = stop
        while value_end > value_start and text[value_end - 1] in WHITESPACE:
            value_end -= 1
        scan.values[key] = (value_start, value_end)
        if text[stop] == "}":
            scan.end = stop + 1
            return scan
        pos = skip_ws(text, stop + 1)  # after the ','
    return scan


def value_text(text: str, scan: ObjectScan, key: str) -> tuple[str, bool] | None:
    """(raw text of `key`'s value so far, complete?) or None if the key has not appeared.
    An open value is right-stripped: trailing whitespace may still turn out to be outside it."""
    span = scan.values.get(key)
    if span is None:
        return None
    start, end = span
    if end is None:
        return text[start:].rstrip(WHITESPACE), False
    return text[start:end], True
