"""Chat templates: render a conversation into a prompt string, the way llama-server does.

Owns: compiling `tokenizer.chat_template` (untrusted Jinja from the GGUF file) with Hugging Face's
conventions (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`,
`raise_exception`, `strftime_now`, HF's `tojson`, loop controls, trim/lstrip blocks), choosing the
template for a model (`for_model`), rendering, and `check()` (does it render at all, for start-up).
Templates run in `ggserve.server.chat.sandbox.ChatSandbox` (Jinja2's immutable sandbox, bounded in
time and memory by `TemplateLimits`). Message normalisation and llama.cpp's polyfills (for
templates without a system role, tool support or string content) live in
`ggserve.server.chat.polyfills`; the named built-ins in `ggserve.server.chat.builtin_templates`.
Every failure -- syntax, `raise_exception`, sandbox violation, a limit, runtime error -- is a
`ChatTemplateError` with a one-line message.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import re
import warnings
from typing import Any, Iterable, Iterator, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from ggserve.server.chat.polyfills import (TemplateCaps, apply_polyfills, normalize_messages,
                                            probe_caps, text_of)
from ggserve.server.chat.builtin_templates import BUILTIN_ALIASES, BUILTIN_SOURCES
from ggserve.server.chat.sandbox import ChatSandbox, TemplateLimitError, TemplateLimits, size_text

BUILTIN_TEMPLATES: tuple[str, ...] = tuple(sorted({*BUILTIN_SOURCES, *BUILTIN_ALIASES}))
DEFAULT_TEMPLATE = "chatml"  # llama-server's fallback when the model ships no template
DEFAULT_LIMITS = TemplateLimits()
CHECK_CONVERSATION = (  # what check() renders
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "How are you?"},
)
CHECK_TOOL = {"type": "function", "function": {  # and check() gives `tool_use` templates
    "name": "get_time", "description": "The current time in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city's name."}}}}}
_MAX_MESSAGE = 400  # an error message longer than this is cut
_log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The template failed to compile or render; the message says why (one line)."""


class _TemplateRaised(Exception):
    """Raised by the template's own `raise_exception(message)`."""


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    if isinstance(fmt, str) and len(fmt) > 256:  # each directive may expand ~10x
        raise ValueError("strftime_now() format is longer than 256 characters")
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's tojson: no HTML escaping, keep non-ASCII, keep key order (unlike Jinja's builtin).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys, default=_json_default)


def _json_default(value: Any) -> Any:
    # Jinja's map/select/reject yield generators where llama.cpp's engine yields lists
    # (`tools | map(attribute='function') | tojson` in llama.cpp's own DeepSeek R1 template).
    if isinstance(value, Iterator):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _from_json(text: str) -> Any:
    return json.loads(text)


# Python names these functions in its errors ("tojson() got an unexpected keyword argument"):
# the names templates know them by, not ours.
for _f, _name in ((_raise_exception, "raise_exception"), (_strftime_now, "strftime_now"),
                  (_tojson, "tojson"), (_from_json, "from_json")):
    _f.__name__ = _f.__qualname__ = _name


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _make_environment(limits: TemplateLimits) -> jinja2.Environment:
    return ChatSandbox(limits, filters={"tojson": _tojson, "from_json": _from_json},
                       functions={"raise_exception": _raise_exception,
                                  "strftime_now": _strftime_now},
                       trim_blocks=True, lstrip_blocks=True,
                       extensions=[jinja2.ext.loopcontrols, _GenerationTag])


def _template_line(tb) -> int | None:
    """Line in the template where a render error happened (Jinja rewrites tracebacks)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# Python's names for our code and objects, which a message must not show: qualified names
# ("pkg.mod.Class.method()" -> "method()"), reprs ("<bound method X.y of <...>>" -> "y"),
# addresses, and Jinja's function names for its filters ("sync_do_join()" -> "join()").
_INTERNAL_NAMES = (
    (re.compile(r"<(?:bound method|built-in method|function|method) (?:[\w<>]+\.)*(\w+)"
                r"(?: of <[^<>]*>| at 0x[0-9a-f]+)?>"), r"\1"),
    (re.compile(r"<(?:[\w]+\.)*(\w+) object at 0x[0-9a-f]+>"), r"\1 object"),
    (re.compile(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*\()"), ""),
    (re.compile(r"\b(?:sync_|async_)?do_(\w+)\(\)"), r"\1()"),
)


def _public_message(text: str) -> str:
    text = " ".join(text.split())
    for pattern, replacement in _INTERNAL_NAMES:
        text = pattern.sub(replacement, text)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


def _error(exc: BaseException, what: str) -> ChatTemplateError:
    if isinstance(exc, _TemplateRaised):
        return ChatTemplateError(f"chat template raised an exception: {_public_message(str(exc))}")
    line = getattr(exc, "lineno", None) or _template_line(exc.__traceback__)
    where = f" (template line {line})" if line else ""
    if isinstance(exc, TemplateLimitError):
        return ChatTemplateError(f"{exc}{where}")
    kind = "sandbox violation" if isinstance(exc, jinja2.sandbox.SecurityError) else type(exc).__name__
    message = _public_message(str(exc)) or kind
    return ChatTemplateError(f"chat template {what} failed: {kind}: {message}{where}")


def _plain_data(value: Any) -> Any:
    """Deep copy of request data as plain dict/list/scalars (pydantic models are dumped)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, Mapping):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    return copy.deepcopy(value)


class ChatTemplate:
    """A compiled chat template. `render(messages)` returns the prompt text.

    `add_bos` / `add_eos`: the tokenizer adds BOS / EOS itself, so a BOS text at the start (EOS
    text at the end) of the rendered prompt is removed, as llama.cpp does, to avoid doubling it.
    `tool_use`: an alternative template used when tools are given (the GGUF's
    `tokenizer.chat_template.tool_use`).
    `limits`: how long one render may take and how much text it may build (`TemplateLimits`).
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 name: str = "custom", add_bos: bool = False, add_eos: bool = False,
                 tool_use: "ChatTemplate | None" = None, limits: TemplateLimits = DEFAULT_LIMITS):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
        if not isinstance(limits, TemplateLimits):
            raise TypeError(f"limits must be a TemplateLimits, got {type(limits).__name__}")
        self.source, self.name, self.limits = source, name, limits
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.add_bos, self.add_eos, self.tool_use = add_bos, add_eos, tool_use
        self._is_builtin = name in BUILTIN_SOURCES
        self._caps: TemplateCaps | None = None  # probed on first render
        self.warning: str | None = None  # set when for_model had to fall back
        try:
            with warnings.catch_warnings():
                # Jinja's lexer warns on `'\d'`-style escapes in string literals: template
                # authors' business, not noise for the server log.
                warnings.simplefilter("ignore", DeprecationWarning)
                self._env = _make_environment(limits)
                self._template = self._env.from_string(source)
        except Exception as e:  # TemplateSyntaxError, or anything the parser trips on
            raise _error(e, "compilation") from None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def builtin(cls, name: str, bos_token: str = "", eos_token: str = "", *,
                limits: TemplateLimits = DEFAULT_LIMITS) -> "ChatTemplate":
        canonical = BUILTIN_ALIASES.get(name, name)
        if canonical not in BUILTIN_SOURCES:
            raise ChatTemplateError(f"unknown chat template {name!r}; built-in templates: "
                                    f"{', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_SOURCES[canonical], bos_token, eos_token, name=canonical, limits=limits)

    @classmethod
    def for_model(cls, metadata: Mapping[str, Any], tokenizer: Any = None, name: str | None = None,
                  source: str | None = None, *,
                  limits: TemplateLimits = DEFAULT_LIMITS) -> "ChatTemplate":
        """The template llama-server would use: `source` (--chat-template-file) or `name`
        (--chat-template: a built-in name, or Jinja text) if given; else the model's own
        `tokenizer.chat_template`; else chatml. Every render is bounded by `limits`."""
        bos, eos, add_bos, add_eos = "", "", False, False
        if tokenizer is not None:
            if tokenizer.bos_id is not None:
                bos = tokenizer.token_text(tokenizer.bos_id)
            if tokenizer.eos_id is not None:
                eos = tokenizer.token_text(tokenizer.eos_id)
            add_bos, add_eos = bool(tokenizer.add_bos), bool(tokenizer.add_eos)
        if source is None and name:
            if name in BUILTIN_TEMPLATES:
                return cls.builtin(name, bos, eos, limits=limits)
            if "{{" not in name and "{%" not in name:
                raise ChatTemplateError(f"unknown chat template {name!r}; built-in templates: "
                                        f"{', '.join(BUILTIN_TEMPLATES)}")
            source = name  # llama-server --jinja accepts template text in --chat-template
        if source is not None:
            return cls(source, bos, eos, add_bos=add_bos, add_eos=add_eos, limits=limits)
        model_source = metadata.get("tokenizer.chat_template")
        if not isinstance(model_source, str) or not model_source.strip():
            return cls.builtin(DEFAULT_TEMPLATE, bos, eos, limits=limits)
        tool_use = None
        tool_source = metadata.get("tokenizer.chat_template.tool_use")
        if isinstance(tool_source, str) and tool_source.strip():
            try:
                tool_use = cls(tool_source, bos, eos, name="model-tool-use", add_bos=add_bos,
                               add_eos=add_eos, limits=limits)
            except ChatTemplateError as e:
                _log.warning("ignoring the model's tool_use chat template: %s", e)
        try:
            return cls(model_source, bos, eos, name="model", add_bos=add_bos, add_eos=add_eos,
                       tool_use=tool_use, limits=limits)
        except ChatTemplateError as e:
            # Like llama-server: a model template that does not parse means chatml, not a crash.
            fallback = cls.builtin(DEFAULT_TEMPLATE, bos, eos, limits=limits)
            fallback.warning = f"the model's chat template is unusable ({e}); using chatml"
            _log.warning(fallback.warning)
            return fallback

    # -- rendering --------------------------------------------------------------------------
    def render(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt; a ChatTemplateError if the template fails or goes past `self.limits`
        (then within about `limits.max_render_seconds`: the rendering thread stops itself)."""
        if tools and self.tool_use is not None:
            return self.tool_use.render(messages, add_generation_prompt, tools, **extra)
        msgs = self._checked_messages(messages)
        tools_data = _plain_data(list(tools)) if tools else None
        if " functools[" in self.source:
            # Firefunction v2 reads `functions` and `datetime` instead of `tools`: llama.cpp
            # supplies them (and no `tools`) for this template family; so do we.
            extra = {"datetime": datetime.datetime.now().strftime("%b %d %Y %H:%M:%S GMT"),
                     "functions": json.dumps(tools_data, indent=2) if tools_data else "", **extra}
            tools_data = None
        try:  # every template failure becomes one clear error
            with self._env.limited():  # one deadline for the probes (first render) and the render
                if self._is_builtin:
                    # llama.cpp's C++ formatters see each message as plain role + content strings.
                    msgs = [{"role": m["role"], "content": text_of(m.get("content"))} for m in msgs]
                else:
                    msgs = apply_polyfills(normalize_messages(msgs), tools_data, self.caps)
                prompt = self._raw_render(msgs, tools_data, add_generation_prompt, extra)
        except ChatTemplateError:
            raise
        except Exception as e:
            raise _error(e, "rendering") from None
        if self.add_bos and self.bos_token and prompt.startswith(self.bos_token):
            prompt = prompt[len(self.bos_token):]
        if self.add_eos and self.eos_token and prompt.endswith(self.eos_token):
            prompt = prompt[:-len(self.eos_token)]
        return prompt

    def check(self) -> None:
        """Render a plain system/user/assistant conversation once: a ChatTemplateError (one line)
        if the template cannot, for the server to call at start-up. A `tool_use` template that
        cannot is dropped with a warning (as one that does not parse is)."""
        try:
            self.render(CHECK_CONVERSATION)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"the {self.name} chat template cannot render a plain "
                                    f"conversation: {e}") from None
        if self.tool_use is not None:
            try:
                self.tool_use.render(CHECK_CONVERSATION, tools=[CHECK_TOOL])
            except ChatTemplateError as e:
                _log.warning("ignoring the model's tool_use chat template: %s", e)
                self.tool_use = None

    def _raw_render(self, messages: list, tools: list | None, add_generation_prompt: bool,
                    extra: Mapping[str, Any]) -> str:
        context = _plain_data(dict(extra))  # a copy: templates may mutate lists they get
        context.update(messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token, eos_token=self.eos_token)
        if tools is not None:  # like llama.cpp: `tools` is undefined, not none, without tools
            context["tools"] = tools
        with self._env.limited():
            parts, size, limit = [], 0, self.limits.max_output_bytes
            for part in self._template.generate(context):
                size += len(part)
                if size > limit:
                    raise TemplateLimitError("the chat template's output exceeded "
                                             f"{size_text(limit)}")
                parts.append(part)
        return "".join(parts)

    @staticmethod
    def _checked_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict]:
        msgs = _plain_data(list(messages))
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ChatTemplateError(f"message #{i} must be an object with a string 'role'")
        return msgs

    # -- llama.cpp's polyfills --------------------------------------------------------------
    @property
    def caps(self) -> TemplateCaps:
        if self._caps is None:
            try:
                with self._env.limited():  # all the probes share one deadline
                    self._caps = probe_caps(self._try_render)
            except TemplateLimitError as e:
                raise _error(e, "probing") from None
        return self._caps

    def _try_render(self, messages: list, tools: list | None = None) -> str:
        try:
            return self._raw_render(copy.deepcopy(messages), copy.deepcopy(tools), False, {})
        except TemplateLimitError:
            raise  # a template past its limits in a probe is past them in the render too
        except Exception:
            return ""
