"""The sandbox chat templates render in: Jinja2's ImmutableSandboxedEnvironment, bounded in time
and memory (a template is untrusted code, from a GGUF file or --chat-template-file).

Owns: `TemplateLimits` (the bounds of one render), `TemplateLimitError` (its message says what
the template did) and `ChatSandbox`, the environment that enforces them inside `limited()`:
- time: a deadline, checked at each `{% for %}` iteration (every loop's iterable goes through a
  filter that checks it), call (macros, methods, globals, a recursive `loop()`), filter, test
  and operator -- not in a `sys.settrace` hook, which made the real templates' renders 2-4x
  slower. Between two checks a template runs one operation, on values the size bounds keep small.
- size: a string the template builds (`~`, `+`, `*`, `%`, `.format()`, str methods, the growing
  filters, macro and block output) is measured before it is built and refused above
  `max_output_bytes`; so are a list's items (8 bytes each) and the text of a list or dict shown,
  repeated or newly made. What a render keeps (added to lists, dicts, namespaces, macro and block
  output) is counted against `max_held_bytes`, so a loop cannot pile up values forever.
The size estimates themselves are sizes.py's. Jinja's `pprint`, `urlize`, `wordwrap` and `xmlattr` filters and `lipsum()` are not offered: no
model's template uses them, llama.cpp's template engine lacks them, and what they make is costly
to bound.
"""
from __future__ import annotations

import math
import threading
import time
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext, Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

from ggserve.server.chat.sizes import (CONTAINERS, FILTER_SIZES, ITEM, NUMBERS, OBJECT, TEXT, MiB, format_size, printf_size,
                                      replace_size, size_text, split_count, text_size)

_INT_BITS = 1 << 16  # integers a template computes stay below 2**65536
_LIST_GROWERS = frozenset({"append", "extend", "insert"})
_LIST_MUTATORS = _LIST_GROWERS | {"pop"}
_EXISTING = frozenset({"get", "pop"})  # dict/list methods that return what is already there
_PLAIN_FILTERS = frozenset({"abs", "attr", "count", "d", "default", "first", "float", "int", "last",
                            "length", "max", "min", "random", "round", "wordcount"})
_DROPPED = {"filters": ("pprint", "urlize", "wordwrap", "xmlattr"), "globals": ("lipsum",)}
_TICKING = "ticking loop"  # the filter every loop's iterable goes through (no template can name it)


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one render of a chat template (one `ChatTemplate.render` call).

    max_render_seconds: 10 s of wall-clock time. Real templates render a short chat in well
        under 1 ms (a first render, which also probes the template, in ~1 ms), but some take
        time quadratic in the turns (gemma-4: ~2.5 s for 1000 messages): 10 s keeps long chats
        working on a loaded machine, and is what a hostile template can hold a worker thread.
    max_output_bytes: 8 MiB, the largest prompt and the largest string (or text of a list or
        dict) made on the way; a list holds at most 1/8 as many items. 8 MiB is about 2M tokens,
        twice the text of the longest (1M-token) contexts.
    max_held_bytes: what a render may keep in lists, dicts, namespaces and macro/block output,
        added up as it is added; None means 16 x max_output_bytes (128 MiB by default). Real
        templates keep up to ~5x their output plus ~0.7 KiB a message: a full 8 MiB prompt of
        short messages stays under 100 MiB.
    """

    max_render_seconds: float = 10.0
    max_output_bytes: int = 8 * MiB
    max_held_bytes: int | None = None

    def __post_init__(self) -> None:
        seconds = self.max_render_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"max_render_seconds must be a positive number, got {seconds!r}")
        if self.max_held_bytes is None and isinstance(self.max_output_bytes, int):
            object.__setattr__(self, "max_held_bytes", 16 * self.max_output_bytes)
        for name in ("max_output_bytes", "max_held_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
                raise ValueError(f"{name} must be an integer of at least 1024, got {value!r}")

    @property
    def max_items(self) -> int:
        return self.max_output_bytes // ITEM


class TemplateLimitError(Exception):
    """A render went past its `TemplateLimits`; the message says what the template did."""


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, sending `~`, literals and block output through the sandbox."""

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.join_parts((")  # not str_join((...)): measured first
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _literal(self, visit, node, frame) -> None:
        self.write("environment.made(")
        visit(node, frame)
        self.write(", 'a literal')")

    def visit_List(self, node, frame) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "store":  # an assignment target, not a value
            return super().visit_Tuple(node, frame)
        self._literal(super().visit_Tuple, node, frame)

    def _output_child_pre(self, node, frame, finalize) -> None:
        if frame.buffer is not None:  # a macro's or block's output: kept until it returns
            self.write("environment.held(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node, frame, finalize) -> None:
        super()._output_child_post(node, frame, finalize)
        if frame.buffer is not None:
            self.write(")")


class _RenderState(threading.local):  # outside a render: no bounds
    deadline = math.inf
    left = math.inf  # what the render may still hold


class _Limited:
    __slots__ = ("env", "outer")

    def __init__(self, env: "ChatSandbox"):
        self.env = env

    def __enter__(self) -> None:
        state, limits = self.env._state, self.env.limits
        self.outer = state.deadline != math.inf
        if not self.outer:
            state.left = limits.max_held_bytes
            state.deadline = time.monotonic() + limits.max_render_seconds

    def __exit__(self, *exc: Any) -> None:
        if not self.outer:
            self.env._state.deadline = self.env._state.left = math.inf


class ChatSandbox(ImmutableSandboxedEnvironment):
    """HF's sandbox, bounded by `limits` inside `with env.limited():` (a render). Also allows list
    append/pop/extend/insert, which some templates (Kimi K2) use on their own scratch lists: safe
    because the caller deep-copies every input; dicts and sets stay immutable, dunders blocked."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"-"})

    def __init__(self, limits: TemplateLimits, filters: Mapping | None = None,
                 functions: Mapping | None = None, **options: Any):
        super().__init__(finalize=self._finalize, **options)
        self.limits, self._state = limits, _RenderState()
        self._max_text, self._max_items = limits.max_output_bytes, limits.max_items
        for kind, names in _DROPPED.items():
            for name in names:
                getattr(self, kind).pop(name, None)
        self.filters.update(filters or {})
        self.globals.update(functions or {})
        for name, func in list(self.filters.items()):
            if name not in _PLAIN_FILTERS:
                self.filters[name] = self._guarded_filter(name, func)
        self.filters[_TICKING] = self.ticking

    # -- the bounds ---------------------------------------------------------------------------
    def limited(self) -> _Limited:
        """`with env.limited():` bounds what runs inside (a render) by `limits`; a nested use
        shares the outer bounds."""
        return _Limited(self)

    def tick(self) -> None:
        if time.monotonic() > self._state.deadline:
            raise TemplateLimitError("rendering the chat template took longer than "
                                     f"{self.limits.max_render_seconds:g} s")

    def check_text(self, size: int, what: Any) -> None:
        if size > self._max_text:
            raise TemplateLimitError(f"the chat template's text is too large: {_what(what)} "
                                     f"makes {size_text(size)}, over the "
                                     f"{size_text(self._max_text)} limit")

    def check_items(self, n: int, what: Any) -> None:
        if n > self._max_items:
            raise TemplateLimitError(f"the chat template's list is too large: {_what(what)} "
                                     f"makes {n} items, over the {self.limits.max_items} limit")

    def hold(self, size: int) -> None:
        state = self._state
        state.left -= size
        if state.left < 0:
            raise TemplateLimitError("the chat template kept more than "
                                     f"{size_text(self.limits.max_held_bytes)} in one render")

    def made(self, value: Any, what: Any, holds: bool = True) -> Any:
        """Check a value an operation made (operations that can grow one check before), and count
        what a new container or namespace holds (its slots and strings) if `holds`: not for an
        operator's, which usually replaces its operand (`ns.items = ns.items + [item]`)."""
        if value.__class__ is str or isinstance(value, TEXT):
            if len(value) > self._max_text:
                self.check_text(len(value), what)
        elif isinstance(value, CONTAINERS):
            self.check_items(len(value), what)
            self.check_text(text_size(value, self._max_text, tick=self.tick), what)
            if holds:
                self.hold(_held(value))
        elif isinstance(value, Namespace):
            self.hold(4 * OBJECT)
        return value

    def text(self, value: Any, what: Any) -> str:
        """str(value), checked before it is made."""
        if isinstance(value, str):
            return value
        self.check_text(text_size(value, self._max_text, tick=self.tick), what)
        return str(value)

    # -- hooks in the generated code ----------------------------------------------------------
    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):  # (Jinja allows no new node types)
            loop.iter = nodes.Filter(loop.iter, _TICKING, [], [], None, None, lineno=loop.lineno)
        tree.set_environment(self)
        return tree

    def ticking(self, iterable: Any) -> Iterator:
        self.tick()
        state, n = self._state, 0
        for item in iterable:
            n += 1
            if not n & 15 and time.monotonic() > state.deadline:  # every 16th: cheaper
                self.tick()
            yield item

    def join_parts(self, parts: tuple) -> str:  # `a ~ b ~ c`
        size = sum(len(p) if p.__class__ is str else text_size(p, self._max_text, tick=self.tick)
                   for p in parts)
        self.check_text(size, "`~`")
        return "".join([p if p.__class__ is str else str(p) for p in parts])

    def concat(self, parts: Any) -> str:  # the output of a macro, call or {% set %} block
        parts = parts if isinstance(parts, list) else list(parts)
        self.check_text(sum(map(len, parts)), "a macro or block")
        return "".join(parts)

    def held(self, text: str) -> str:  # one output of a macro or block
        self.hold(len(text) + ITEM)
        return text

    def _finalize(self, value: Any) -> Any:  # each `{{ value }}`, before str(value)
        if value.__class__ is not str:
            self.check_text(text_size(value, self._max_text, tick=self.tick), "`{{ }}`")
        return value

    # -- the sandbox's interception points ------------------------------------------------------
    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, list) and attr in _LIST_MUTATORS:
            return SandboxedEnvironment.is_safe_attribute(self, obj, attr, value)
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if left.__class__ in NUMBERS and right.__class__ in NUMBERS and operator not in "**":
            return self.binop_table[operator](left, right)  # no bigger than its operands
        if operator == "+" and left.__class__ is str and right.__class__ is str:
            if len(left) + len(right) > self._max_text:
                self.check_text(len(left) + len(right), "`+`")
            return left + right
        what = f"`{operator}`"
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, TEXT):
                self.check_text(len(seq) * max(n, 0), what)
            elif isinstance(n, int) and isinstance(seq, (list, tuple)):
                self.check_items(len(seq) * max(n, 0), what)
                self.check_text(text_size(seq, self._max_text) * max(n, 0), what)
            elif isinstance(seq, int) and isinstance(n, int):
                _check_bits(seq.bit_length() + n.bit_length(), what)
        elif operator == "+" and isinstance(left, (*TEXT, list, tuple)) \
                and isinstance(right, (*TEXT, list, tuple)):
            (self.check_text if isinstance(left, TEXT) else self.check_items)(
                len(left) + len(right), what)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1:
            _check_bits((left.bit_length() - 1) * right, what)
        elif operator == "%" and isinstance(left, str):
            self.check_text(printf_size(left, right, self._max_text), what)
        return self.made(self.binop_table[operator](left, right), what, holds=False)

    def call_unop(self, context, operator: str, arg: Any) -> Any:
        return self.unop_table[operator](arg)  # only `-`, made no bigger

    def call(self, context, obj, /, *args: Any, **kwargs: Any) -> Any:
        self.tick()
        name = ""
        if isinstance(obj, (types.BuiltinMethodType, types.MethodType)):
            owner, name = obj.__self__, obj.__name__
            if isinstance(owner, TEXT):
                args = self._check_text_method(owner, name, args, kwargs)
            elif isinstance(owner, list) and name in _LIST_GROWERS and args:
                if name == "extend":
                    args = (list(args[0]), *args[1:])
                added = args[0] if name == "extend" else args[-1:]
                self.check_items(len(owner) + len(added), f"`.{name}()`")
                self.hold(ITEM * len(added) + text_size(added, self.limits.max_held_bytes))
        elif isinstance(obj, LoopContext) and args:  # a recursive loop's `loop(children)`
            args = (self.ticking(args[0]), *args[1:])
        value = super().call(context, obj, *args, **kwargs)
        return value if name in _EXISTING else self.made(value, obj)

    def _check_text_method(self, s: Any, name: str, args: tuple, kwargs: Mapping) -> tuple:
        what = f"`.{name}()`"
        if name == "join" and args:
            args = (list(args[0]), *args[1:])
            size = sum(len(i) for i in args[0] if isinstance(i, TEXT))
            self.check_text(size + len(s) * max(len(args[0]) - 1, 0), what)
        elif name in ("center", "ljust", "rjust", "zfill"):
            width = args[0] if args else kwargs.get("width")
            self.check_text(max(len(s), width if isinstance(width, int) else 0), what)
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            tabs = s.count("\t" if isinstance(s, str) else b"\t")
            self.check_text(len(s) + tabs * (tab if isinstance(tab, int) else 0), what)
        elif name == "replace" and len(args) >= 2:
            self.check_text(replace_size(s, *args[:3]), what)
        elif name == "translate" and args:
            table = args[0].values() if isinstance(args[0], Mapping) else args[0] \
                if isinstance(args[0], (list, tuple, str)) else ()
            longest = max((len(v) for v in table if isinstance(v, TEXT)), default=1)
            self.check_text(len(s) * longest, what)
        elif name in ("split", "rsplit"):
            self.check_items(split_count(s, args, kwargs), what)
        return args

    def call_test(self, *args: Any, **kwargs: Any) -> Any:  # select/reject/...attr's loop
        self.tick()
        return super().call_test(*args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:  # (on every attribute access: quick exit)
        if value.__class__ is not types.BuiltinMethodType \
                and not isinstance(value, types.MethodType):
            return None
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            a, kw = ((), args[0]) if is_map and len(args) == 1 else (args, kwargs)
            self.check_text(format_size(fmt, a, kw, self._max_text), "`.format()`")
            return wrapper(*args, **kwargs)

        bounded_format.__name__ = bounded_format.__qualname__ = value.__name__
        return bounded_format

    def _guarded_filter(self, name: str, func: Any) -> Any:
        estimate, what = FILTER_SIZES.get(name), f"the `{name}` filter"
        skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            if estimate is not None and len(args) > skip:
                if isinstance(args[skip], Iterator):  # sized up first, so seen twice
                    args = (*args[:skip], list(args[skip]), *args[skip + 1:])
                try:
                    size = estimate(self, *args[skip:], **kwargs)
                except (TypeError, ValueError, AttributeError, LookupError):
                    size = 0  # bad arguments: the filter itself says what is wrong
                self.check_text(size, what)
            return self.made(func(*args, **kwargs), what)

        if skip:
            guarded.jinja_pass_arg = func.jinja_pass_arg
        guarded.__name__ = guarded.__qualname__ = name
        return guarded


def _held(value: Any) -> int:
    """Bytes a new container adds: its slots, and the strings it holds."""
    slots = (ITEM if isinstance(value, (list, tuple)) else 8 * ITEM) * len(value) + OBJECT
    items = value.values() if isinstance(value, dict) else value
    return slots + (sum(len(x) for x in items if isinstance(x, TEXT)) if len(value) else 0)


def _check_bits(bits: int, what: str) -> None:
    if bits > _INT_BITS:
        raise TemplateLimitError(f"the chat template's number is too large: {what} makes {bits} "
                                 f"bits, over the {_INT_BITS} bit limit")


def _what(what: Any) -> str:
    if isinstance(what, str):
        return what
    name = getattr(what, "__name__", None)
    return f"`{name}()`" if isinstance(name, str) else "a call"
