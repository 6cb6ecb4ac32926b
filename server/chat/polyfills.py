"""llama.cpp's chat-message preparation for Jinja templates: normalising OpenAI-style messages
the way llama-server does, probing what a template can render, and rewriting the conversation
for templates that cannot (minja's "polyfills").

Owns: `normalize_messages` (content null -> "", tool-call arguments as JSON text, typed content
parts kept), `TemplateCaps` + `probe_caps` (render needle conversations and look for the
needles), and `apply_polyfills` (system role folded into the next user turn, tools described in
a system message, tool calls / tool responses written as JSON text, object arguments, typed
content). Pure functions over plain dict/list data; `ggserve.server.chat.template` calls them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

TryRender = Callable[..., str]  # (messages, tools=None) -> rendered text, "" on any failure


@dataclass(frozen=True)
class TemplateCaps:
    """What a template renders natively (minja's `chat_template_caps`)."""

    supports_system_role: bool = True
    supports_tools: bool = True
    supports_tool_calls: bool = True
    supports_tool_responses: bool = True
    requires_object_arguments: bool = False
    requires_typed_content: bool = False


def text_of(content: Any) -> str:
    """String form of a message's content: text parts joined with "\\n" as llama.cpp does."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def normalize_messages(msgs: list[dict]) -> list[dict]:
    """What llama-server hands a template: content is a string (null -> "") or typed parts;
    tool-call arguments are JSON text (objects are serialised compactly, like nlohmann)."""
    for m in msgs:
        if m.get("content") is None:
            m["content"] = ""
        for call in m.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and not isinstance(function.get("arguments"), str) \
                    and "arguments" in function:
                function["arguments"] = json.dumps(function["arguments"], ensure_ascii=False,
                                                   separators=(",", ":"))
    return msgs


def probe_caps(try_render: TryRender) -> TemplateCaps:
    """Render needle conversations to learn what the template handles (as minja does)."""
    user_needle, sys_needle = "<User Needle>", "<System Needle>"
    str_user = {"role": "user", "content": user_needle}
    typed_user = {"role": "user", "content": [{"type": "text", "text": user_needle}]}
    typed = (user_needle not in try_render([str_user])
             and user_needle in try_render([typed_user]))
    user = typed_user if typed else str_user
    system = {"role": "system",
              "content": [{"type": "text", "text": sys_needle}] if typed else sys_needle}
    supports_system = sys_needle in try_render([system, user])
    tool = {"type": "function", "function": {
        "name": "some_tool", "description": "Some tool.",
        "parameters": {"type": "object", "properties": {
            "arg": {"type": "string", "description": "Some argument."}}, "required": ["arg"]}}}
    supports_tools = "some_tool" in try_render([user], [tool])

    def call_msg(name: str, arguments: Any) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1___", "type": "function",
            "function": {"name": name, "arguments": arguments}}]}

    def renders_args(text: str) -> bool:
        return '"argument_needle":' in text or "'argument_needle':" in text

    args = {"argument_needle": "print('Hello, World!')"}
    str_args = renders_args(try_render([user, call_msg("ipython", json.dumps(args))]))
    obj_args = renders_args(try_render([user, call_msg("ipython", args)]))
    supports_calls = str_args or obj_args
    supports_responses = False
    if supports_calls:
        response = {"role": "tool", "name": "test_tool1", "content": "Some response!",
                    "tool_call_id": "call_911_"}
        call = call_msg("test_tool1", args if obj_args and not str_args else json.dumps(args))
        supports_responses = "Some response!" in try_render([user, call, response])
    return TemplateCaps(supports_system_role=supports_system, supports_tools=supports_tools,
                        supports_tool_calls=supports_calls,
                        supports_tool_responses=supports_responses,
                        requires_object_arguments=obj_args and not str_args,
                        requires_typed_content=typed)


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)  # nlohmann dump(2) layout


def _parse_arguments(call: Any) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass  # leave arguments that are not JSON as the client sent them


def _tool_calls_as_text(m: dict) -> None:
    calls = []
    for call in m.pop("tool_calls") or ():
        if not isinstance(call, dict) or call.get("type") != "function":
            continue
        function = call.get("function") or {}
        entry = {"name": function.get("name"), "arguments": function.get("arguments")}
        if "id" in call:
            entry["id"] = call["id"]
        calls.append(entry)
    wrapped: dict[str, Any] = {"tool_calls": calls}
    if m.get("content"):
        wrapped["content"] = m["content"]
    m["content"] = _json_text(wrapped)


def _tool_response_as_text(m: dict) -> None:
    response: dict[str, Any] = {}
    if "name" in m:
        response["tool"] = m.pop("name")
    response["content"] = m.get("content")
    if "tool_call_id" in m:
        response["tool_call_id"] = m["tool_call_id"]
    m["role"] = "user"
    m["content"] = _json_text({"tool_response": response})


def fold_system_messages(msgs: list[dict]) -> list[dict]:
    """For templates without a system role: system text goes into the next user message, or
    into a user message of its own before any other role."""
    out: list[dict] = []
    pending = ""
    for m in msgs:
        content = text_of(m.get("content"))
        if m["role"] == "system":
            pending = pending + "\n" + content if pending else content
            continue
        if pending and m["role"] == "user":
            m["content"] = pending + ("\n" + content if content else "")
        elif pending:
            out.append({"role": "user", "content": pending})
        pending = ""
        out.append(m)
    if pending:
        out.append({"role": "user", "content": pending})
    return out


def apply_polyfills(msgs: list[dict], tools: list | None, caps: TemplateCaps) -> list[dict]:
    """Rewrite normalised messages into a shape the template renders (minja's polyfills)."""
    if tools and not caps.supports_tools:
        note = ("You can call any of the following tools to satisfy the user's requests: "
                + _json_text(tools))
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": text_of(msgs[0].get("content")) + "\n\n" + note}
        else:
            msgs.insert(0, {"role": "system", "content": note})
    for m in msgs:
        if m.get("tool_calls"):
            if caps.requires_object_arguments or not caps.supports_tool_calls:
                for call in m["tool_calls"]:
                    _parse_arguments(call)
            if not caps.supports_tool_calls:
                _tool_calls_as_text(m)
        if m["role"] == "tool" and not caps.supports_tool_responses:
            _tool_response_as_text(m)
    if not caps.supports_system_role:
        msgs = fold_system_messages(msgs)
    for m in msgs:
        content = m.get("content")
        if caps.requires_typed_content and isinstance(content, str):
            m["content"] = [{"type": "text", "text": content}]
        elif not caps.requires_typed_content and isinstance(content, list):
            m["content"] = text_of(content)
    return msgs
