"""Tool calls in the model's reply: finding them, and turning them into OpenAI messages / deltas.

Owns the reply formats (chosen from the chat template's source, as llama.cpp's common/chat.cpp
does): Hermes 2 Pro / Qwen 2.5 (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
possibly several) and Llama 3.x (`{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`). Both also accept a bare call object — or one in a
``` fence — at the very start of the reply when it names a listed tool (small models often
answer that way). Templates with neither marker get the Hermes parser.

`parse(text, ...)` reads the reply so far; with `final=False` it holds back whatever could
still become a tool call (a partial `<tool_call>` tag, a reply starting with `{` or a fence,
trailing whitespace) so that streamed content never has to be taken back.
`parse_reply` builds the final assistant message; `StreamingReplyParser` diffs successive
parses into `delta.content` / `delta.tool_calls` fragments. A call whose JSON is malformed is
returned as content, never an error. Streaming caveat: a call whose name has already been
streamed stays a call even if its JSON later turns out malformed (the text cannot be unsent).
"""
from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from ggserve.server.chat.json_scan import WHITESPACE, ObjectScan, scan_object, skip_ws, value_text

FENCES = ("```json\n", "```xml\n", "```\n")
CALL_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    open_tag: str  # text that starts a tool call anywhere in the reply
    close_tag: str | None  # text that ends it (None: the object's end does)
    args_keys: tuple[str, ...]  # key holding the arguments, in order of preference
    separators: str = ""  # characters allowed between consecutive calls besides whitespace


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", ("arguments", "parameters"))
LLAMA3 = ToolCallFormat("llama3", "<|python_tag|>", None, ("parameters", "arguments"), separators=";")


def detect_format(template_source: str | None) -> ToolCallFormat:
    """The format the template teaches the model (llama.cpp checks the same markers)."""
    src = template_source or ""
    if "<tool_call>" in src:
        return HERMES
    if "<|start_header_id|>ipython<|end_header_id|>" in src or "<|python_tag|>" in src:
        return LLAMA3
    return HERMES


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(24))


@dataclass
class ParsedCall:
    name: str | None  # None while the name's string is still arriving
    arguments: str  # raw JSON text of the arguments (so far)
    complete: bool


@dataclass
class ParsedReply:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# outcomes of trying to read a call at some position
_NO, _PENDING, _CALL = "no", "pending", "call"


@dataclass
class _Attempt:
    kind: str
    call: ParsedCall | None = None
    end: int = 0  # where parsing continues after the call


def _call_from_scan(text: str, scan: ObjectScan, fmt: ToolCallFormat, final: bool) -> ParsedCall | None:
    """A call from a scanned object; None if it is not a (valid) call."""
    if scan.complete:
        try:
            obj = json.loads(text[scan.start:scan.end])
        except ValueError:
            return None
        name = obj.get("name") if isinstance(obj, dict) else None
        key = next((k for k in fmt.args_keys if k in obj), None) if isinstance(obj, dict) else None
        if not isinstance(name, str) or key is None:
            return None
        args = obj[key]
        if isinstance(args, str):  # some models send the arguments JSON-encoded already
            return ParsedCall(name, args, True)
        raw = value_text(text, scan, key)
        return ParsedCall(name, raw[0] if raw else json.dumps(args, ensure_ascii=False), True)
    if final or scan.broken:
        return None
    name_raw = value_text(text, scan, "name")
    name = json.loads(name_raw[0]) if name_raw and name_raw[1] else None
    if name is not None and not isinstance(name, str):
        return None
    key = next((k for k in fmt.args_keys if k in scan.values), None)
    args = value_text(text, scan, key)[0] if key else ""
    if name is None or args.startswith('"'):
        args = ""  # JSON-encoded arguments are sent decoded, once complete
    return ParsedCall(name, args, False)


def _read_object_call(text: str, pos: int, fmt: ToolCallFormat, final: bool,
                      tool_names: frozenset[str] | None) -> _Attempt:
    """A call object at text[pos] ('{' expected). With `tool_names`, the object must name one of
    them (bare objects: otherwise ordinary JSON in the reply would become a call)."""
    if pos >= len(text):
        return _Attempt(_NO if final else _PENDING)
    if text[pos] != "{":
        return _Attempt(_NO)
    scan = scan_object(text, pos)
    if tool_names is not None and not scan.complete and not final and not scan.broken:
        # decide as early as possible whether this bare object is a call
        if scan.keys and scan.keys[0] not in ("name", "type") + fmt.args_keys:
            return _Attempt(_NO)
    call = _call_from_scan(text, scan, fmt, final)
    if call is None:
        return _Attempt(_NO)
    if tool_names is not None:
        if call.name is None:
            return _Attempt(_PENDING)
        if call.name not in tool_names:
            return _Attempt(_NO)
    return _Attempt(_CALL, call, scan.end if scan.end is not None else len(text))


def _read_closer(text: str, pos: int, closer: str | None, final: bool) -> tuple[int, bool]:
    """(position after an optional closing tag, pending?)."""
    if not closer:
        return pos, False
    at = skip_ws(text, pos)
    if text.startswith(closer, at):
        return at + len(closer), False
    if not final and len(text) - at < len(closer) and closer.startswith(text[at:]):
        return pos, True
    return pos, False  # missing closer: lenient, the call stands


def _read_bare_call(text: str, pos: int, fmt: ToolCallFormat, final: bool, tool_names: frozenset[str]) -> _Attempt:
    """A call object (optionally in a ``` fence) at `pos`, at the start of the reply or after a call."""
    fence = next((f for f in FENCES if text.startswith(f, pos)), None)
    if fence is None and not final and any(f.startswith(text[pos:]) for f in FENCES) and pos < len(text):
        return _Attempt(_PENDING)
    start = skip_ws(text, pos + len(fence)) if fence else pos
    attempt = _read_object_call(text, start, fmt, final, tool_names)
    if attempt.kind != _CALL or not attempt.call.complete:
        return attempt
    end, pending = _read_closer(text, attempt.end, "```" if fence else None, final)
    if fence and end == attempt.end and not pending:
        return _Attempt(_NO)  # an opened fence must close
    attempt.end = end
    return _Attempt(_PENDING) if pending else attempt


def parse(text: str, fmt: ToolCallFormat, tool_names: frozenset[str], final: bool) -> ParsedReply:
    """Content and tool calls of the reply `text` (see the module docstring)."""
    reply = ParsedReply("")
    pos = 0
    bare_allowed = True  # at the start of the reply and right after a call
    while True:
        if bare_allowed:
            start = skip_ws(text, pos, fmt.separators if reply.calls else "")
            attempt = _read_bare_call(text, start, fmt, final, tool_names)
            if attempt.kind == _PENDING:
                return reply
            if attempt.kind == _CALL:
                reply.content = reply.content.rstrip(WHITESPACE)
                reply.calls.append(attempt.call)
                if not attempt.call.complete:
                    return reply
                pos = attempt.end
                continue
        bare_allowed = False
        tag_at = text.find(fmt.open_tag, pos)
        if tag_at < 0:
            rest = text[pos:]
            if not final:
                rest = rest[:len(rest) - _held_prefix(rest, fmt.open_tag)].rstrip(WHITESPACE)
            reply.content += rest
            if final and reply.calls:
                reply.content = reply.content.rstrip(WHITESPACE)
            return reply
        after_tag = tag_at + len(fmt.open_tag)
        attempt = _read_object_call(text, skip_ws(text, after_tag), fmt, final, None)
        if attempt.kind == _NO:  # not a call after all: the tag is ordinary text
            reply.content += text[pos:after_tag]
            pos = after_tag
            continue
        reply.content = (reply.content + text[pos:tag_at]).rstrip(WHITESPACE)
        if attempt.kind == _PENDING:
            return reply
        reply.calls.append(attempt.call)
        if not attempt.call.complete:
            return reply
        pos, pending = _read_closer(text, attempt.end, fmt.close_tag, final)
        if pending:
            return reply
        bare_allowed = True


def tool_calls_json(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c, call_id in zip(calls, ids)
    ]


@dataclass(frozen=True)
class ToolParsing:
    """How to read replies for one request: None format = plain content (no tools)."""

    fmt: ToolCallFormat | None = None
    tool_names: frozenset[str] = frozenset()


def parse_reply(text: str, parsing: ToolParsing) -> dict[str, Any]:
    """The final OpenAI assistant message for the reply `text`."""
    if parsing.fmt is None:
        return {"role": "assistant", "content": text}
    reply = parse(text, parsing.fmt, parsing.tool_names, final=True)
    if not reply.calls:
        return {"role": "assistant", "content": text}
    content = reply.content if reply.content.strip(WHITESPACE) else None
    calls = tool_calls_json(reply.calls, [new_call_id() for _ in reply.calls])
    return {"role": "assistant", "content": content, "tool_calls": calls}


class StreamingReplyParser:
    """Turns streamed text into OpenAI `delta` objects: content, and tool-call fragments (the
    first with id, type, name and arguments "", then argument pieces), each with its `index`."""

    def __init__(self, parsing: ToolParsing):
        self.parsing = parsing
        self.text = ""
        self.sent_content = ""
        self.sent_calls: list[list[str]] = []  # [name, arguments sent so far]

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.sent_calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.parsing.fmt is None:
            return [{"content": text}] if text else []
        self.text += text
        return self._diff(parse(self.text, self.parsing.fmt, self.parsing.tool_names, final=False))

    def finish(self) -> list[dict[str, Any]]:
        if self.parsing.fmt is None:
            return []
        reply = parse(self.text, self.parsing.fmt, self.parsing.tool_names, final=True)
        if not reply.calls and not self.sent_calls:
            reply = ParsedReply(self.text)  # as parse_reply: no calls -> the text unchanged
        return self._diff(reply)

    def _diff(self, reply: ParsedReply) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if reply.content.startswith(self.sent_content) and len(reply.content) > len(self.sent_content):
            deltas.append({"content": reply.content[len(self.sent_content):]})
            self.sent_content = reply.content
        for index, call in enumerate(reply.calls):
            if call.name is None:
                break
            if index == len(self.sent_calls):
                self.sent_calls.append([call.name, ""])
                deltas.append(self._call_delta(index, {"name": call.name, "arguments": ""}, new_call_id()))
            elif index > len(self.sent_calls):
                break
            name, sent_args = self.sent_calls[index]
            if name != call.name:
                break  # cannot happen with prefix-stable parses; never re-send
            if call.arguments.startswith(sent_args) and len(call.arguments) > len(sent_args):
                deltas.append(self._call_delta(index, {"arguments": call.arguments[len(sent_args):]}))
                self.sent_calls[index][1] = call.arguments
        return deltas

    @staticmethod
    def _call_delta(index: int, function: dict[str, str], call_id: str | None = None) -> dict[str, Any]:
        fragment: dict[str, Any] = {"index": index}
        if call_id is not None:
            fragment.update({"id": call_id, "type": "function"})
        fragment["function"] = function
        return {"tool_calls": [fragment]}
