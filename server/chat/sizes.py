"""Size estimates for the chat-template sandbox (server/chat/sandbox.py): how many bytes of text
a value, a printf / str.format() call or a growing filter would make, computed from the operands
BEFORE the result is built, so a template cannot allocate past its limit to find out.

Sizes are len() of the text (bytes for ASCII); repr and JSON escapes may add a small factor.
Every estimate stops counting once it passes `limit` (the caller refuses the value then).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import chain
from string import Formatter
from typing import Any

from _string import formatter_field_name_split
from jinja2.filters import make_attrgetter
from jinja2.runtime import Namespace

MiB = 1 << 20
ITEM, OBJECT = 8, 64  # bytes counted for a list item (a pointer) and for any other object
TEXT, CONTAINERS = (str, bytes), (list, tuple, dict, set, frozenset)
NUMBERS, SCALARS = frozenset({int, float, bool}), frozenset({float, bool, type(None)})
_WS, _BWS = tuple(" \t\n\r\x0b\x0c"), tuple(c.encode() for c in " \t\n\r\x0b\x0c")
_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n // scale if n % scale == 0 else round(n / scale, 1)} {unit}"
    return f"{n} bytes"


def text_size(value: Any, limit: int, indent: int = 0, per_item: int = 4, tick=None) -> int:
    """About len(str(value)): nested values as their repr, which JSON matches closely (`indent`
    adds a pretty layout's indentation), shared values once per appearance, as in the text.
    Counted without building the text, and only until past `limit`."""
    if isinstance(value, TEXT):
        return len(value)
    total, steps, stack = 0, 0, [(iter((value,)), 0)]
    while stack and total <= limit:
        it, depth = stack[-1]
        for v in it:
            steps += 1
            if v.__class__ is str:
                total += len(v) + 2
                if total > limit:
                    break
                continue
            if isinstance(v, CONTAINERS):
                n = len(v)
                total += 2 + n * (per_item + indent * (depth + 1)) + indent * depth
                if isinstance(v, dict):
                    stack.append((chain.from_iterable(v.items()), depth + 1))
                    break
                kinds = set(map(type, v)) if n > 8 else None
                if kinds is not None and kinds <= {str}:
                    total += sum(map(len, v)) + 2 * n  # a flat list of strings: at C speed
                elif kinds is not None and kinds <= SCALARS:
                    total += 24 * n
                else:
                    stack.append((iter(v), depth + 1))
                    break
            elif isinstance(v, TEXT):
                total += len(v) + 3
            elif isinstance(v, Namespace):
                stack.append((iter((v._Namespace__attrs,)), depth))
                break
            elif isinstance(v, int):
                total += v.bit_length() * 3 // 10 + 2
            else:
                total += 24 if isinstance(v, float) or v is None else OBJECT
            if total > limit:
                break
            if tick is not None and not steps & 4095:
                tick()
        else:
            stack.pop()
    return total


def printf_size(fmt: str, args: Any, limit: int) -> int:
    """About len(fmt % args), before formatting."""
    total, star, keyless = len(fmt), False, False
    mapping = args if isinstance(args, Mapping) else None
    for key, width, precision, _ in _PRINTF.findall(fmt):
        for n in (width, precision):
            star |= n == "*"
            total += (int(n) if len(n) < 10 else limit + 1) if n.isdigit() else 0
        if mapping is not None and key:
            total += text_size(mapping.get(key), limit)
        keyless |= not key
    values = (args if isinstance(args, tuple) else (args,)) if mapping is None or keyless else ()
    for v in values:
        total += text_size(v, limit) + (abs(v) if star and isinstance(v, int) else 0)
    return total


def format_size(fmt: str, args: tuple, kwargs: Any, limit: int) -> int:
    """About len(fmt.format(*args, **kwargs)), before formatting."""
    total, auto = len(fmt), 0
    kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    try:
        for _, field, spec, _ in Formatter().parse(fmt):
            if field is None:
                continue
            first, _rest = formatter_field_name_split(field)
            if first == "":
                first, auto = auto, auto + 1
            value = args[first] if isinstance(first, int) and first < len(args) else \
                kwargs.get(first) if isinstance(first, str) else None
            total += text_size(value, limit) + sum(int(n) if len(n) < 10 else limit + 1
                                                   for n in re.findall(r"\d+", spec or ""))
            if "{" in (spec or ""):  # a nested width: any integer argument may be it
                total += sum(abs(v) for v in (*args, *kwargs.values()) if isinstance(v, int))
            if total > limit:
                break
    except ValueError:
        pass  # a malformed format string: formatting says so
    return total


def replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, TEXT) and isinstance(old, TEXT) and isinstance(new, TEXT)):
        return len(s) if isinstance(s, TEXT) else 0
    n = s.count(old) if old else len(s) + 1
    n = min(n, count) if isinstance(count, int) and count >= 0 else n
    return len(s) + n * max(len(new) - len(old), 0)


def split_count(s: Any, args: tuple, kwargs: Mapping) -> int:
    sep = args[0] if args else kwargs.get("sep")
    maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
    n = s.count(sep) + 1 if isinstance(sep, type(s)) and sep else \
        sum(map(s.count, _WS if isinstance(s, str) else _BWS)) + 1
    return min(n, maxsplit + 1) if isinstance(maxsplit, int) and maxsplit >= 0 else n


# -- filters that can make more than they are given: their result's size, before making it --
def _join_size(env, value, d="", attribute=None):
    items = map(make_attrgetter(env, attribute), value) if attribute is not None else value
    total, n, limit = 0, 0, env.limits.max_output_bytes
    for item in items:
        total, n = total + text_size(item, limit), n + 1
        if total > limit:
            break
    return total + text_size(d, limit) * max(n - 1, 0)


def _indent_size(env, s, width=4, first=False, blank=False):
    w = width if isinstance(width, int) else text_size(width, env.limits.max_output_bytes)
    lines = s.count("\n") + 1 if isinstance(s, str) else 1
    return text_size(s, env.limits.max_output_bytes) + lines * max(w, 0)


def _tojson_size(env, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    seps = sum(len(s) for s in separators if isinstance(s, str)) if separators else 0
    return text_size(value, env.limits.max_output_bytes, indent=max(pad, 0) + (pad > 0),
                     per_item=4 + seps, tick=env.tick)


def _fill_size(env, value, count, fill_with=None):  # batch / slice: `count` more fill_with
    if isinstance(count, int) and count > 0:
        env.check_items(len(value) + count, "the `batch`/`slice` filter")
        return count * text_size(fill_with, env.limits.max_output_bytes)
    return 0


def _sum_size(env, value, attribute=None, start=0):
    if isinstance(start, (list, tuple)):  # sum(lists, start=[]) copies the growing list each step
        items = map(make_attrgetter(env, attribute), value) if attribute is not None else value
        length, copied = len(start), 0
        for x in items:
            length += len(x) if isinstance(x, (list, tuple)) else 0
            copied += length
        env.check_items(max(length, copied // 64), "the `sum` filter")
    return 0


FILTER_SIZES = {
    "join": _join_size, "indent": _indent_size, "tojson": _tojson_size, "batch": _fill_size,
    "slice": _fill_size, "sum": _sum_size,
    "center": lambda env, v, width=80: max(text_size(v, env.limits.max_output_bytes),
                                           width if isinstance(width, int) else 0),
    "replace": lambda env, s, old, new, count=None: replace_size(
        env.text(s, "the `replace` filter"), old, new, -1 if count is None else count),
    "format": lambda env, v, *args, **kw: printf_size(
        env.text(v, "the `format` filter"), kw or args, env.limits.max_output_bytes),
    "list": lambda env, v: env.check_items(len(v), "the `list` filter") or 0,
}
