"""A chat request's `tools` / `tool_choice`: validation, what the template sees, and the grammar
that forces a call.

Owns `resolve_tools(...) -> ToolPlan`: which tools reach the chat template (none for
`tool_choice: "none"`), how the reply is parsed (`ToolParsing`), and — for `"required"` or a
named function — a GBNF grammar so decoding can only produce a valid call in the model's own
format: for each allowed function `{"name": <const>, "arguments": <its parameter schema>}`
(`"parameters"` for Llama 3), wrapped as `<tool_call>\\n ... </tool_call>` for Hermes/Qwen.
`parallel_tool_calls: false` allows exactly one call; otherwise one or more.
Bad tools / tool_choice values are 400s; a parameter schema the grammar converter cannot
express falls back to "any JSON object" for that function (the name is still enforced).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from ggserve.server import engine_api
from ggserve.server.errors import bad_request
from ggserve.server.chat.tool_calls import HERMES, LLAMA3, ToolCallFormat, ToolParsing, detect_format

log = logging.getLogger("ggserve.server")
ANY_OBJECT = {"type": "object", "additionalProperties": True}
TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict] | None  # passed to the chat template
    parsing: ToolParsing  # how the reply is read
    grammar: str | None  # forces a call (tool_choice required / named)


def _functions(tools: list[dict]) -> list[dict]:
    """The `function` objects of the request's tools (non-function tools are skipped, as llama.cpp)."""
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}] must be an object", "tools")
        if tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"tools[{i}].function.name is required", "tools")
        parameters = function.get("parameters", ANY_OBJECT)
        if not isinstance(parameters, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        try:  # every local $ref must resolve, and the nesting be within bounds (llama.cpp checks too)
            engine_api.check_schema(parameters)
        except ValueError as exc:
            raise bad_request(f"tools[{i}].function.parameters: {exc}", "tools") from None
        functions.append(function)
    return functions


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """("auto" | "none" | "required", the forced function name or None)."""
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise bad_request(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function", "tool_choice")
        if tool_choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs at least one function in tools", "tool_choice")
        return tool_choice, None
    function = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request('tool_choice must look like {"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return "required", name


def _schema_grammar(schema: dict, limits: Any = None) -> str:
    try:
        return engine_api.json_schema_to_grammar(schema, limits=limits)
    except engine_api.GrammarLimitError:  # too big or too deep: the client's to fix (400)
        raise
    except ValueError as exc:  # GrammarError: a keyword the converter cannot express
        log.warning("tool parameters not expressible as a grammar (%s); allowing any object", exc)
        return ""


def _call_schema(function: dict, fmt: ToolCallFormat, any_args: bool, at: str = "#") -> dict:
    """The JSON schema of one call object, to be placed at JSON pointer `at` of the final schema:
    the parameters' own `$ref`s (e.g. into their `$defs`) are rewritten to point there."""
    args_key = fmt.args_keys[0]
    if any_args:
        args = ANY_OBJECT
    else:
        pointer = f"{at}/properties/{args_key.replace('~', '~0').replace('/', '~1')}"
        args = engine_api.rebase_refs(function.get("parameters", ANY_OBJECT), pointer)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, args_key: args},
        "required": ["name", args_key],
    }


def call_grammar(functions: list[dict], fmt: ToolCallFormat, parallel: bool, limits: Any = None) -> str:
    """GBNF for one call (or several, with `parallel`) to one of `functions`, in `fmt`."""
    schemas = []
    for i, function in enumerate(functions):
        at = "#" if len(functions) == 1 else f"#/anyOf/{i}"
        if _schema_grammar(_call_schema(function, fmt, any_args=False), limits):  # expressible on its own
            schemas.append(_call_schema(function, fmt, any_args=False, at=at))
        else:
            schemas.append(_call_schema(function, fmt, any_args=True))
    object_grammar = _schema_grammar(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, limits)
    # the converter names its top rule `root`; ours wraps it in the model's call syntax
    body = re.sub(r"^root ::=", "call-object ::=", object_grammar, count=1, flags=re.M)
    if fmt is LLAMA3:
        call, separator = "call-object", '";" space'
    else:
        call, separator = '"<tool_call>\\n" call-object "</tool_call>"', '"\\n"'
    root = f"root ::= tool-call ({separator} tool-call)*\n" if parallel else "root ::= tool-call\n"
    return root + f"tool-call ::= {call}\n" + body


def resolve_tools(
    tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None, template_source: str | None,
    has_user_constraint: bool, limits: Any = None,
) -> ToolPlan:
    """`limits`: the engine's GrammarLimits for the call grammar (None: the defaults)."""
    functions = _functions(tools or [])
    names = [f["name"] for f in functions]
    mode, forced = _choice(tool_choice, names)
    if mode == "none" or not functions:
        return ToolPlan(None, ToolParsing(), None)
    fmt = detect_format(template_source)
    parsing = ToolParsing(fmt if fmt in (HERMES, LLAMA3) else HERMES, frozenset(names))
    if mode == "auto":
        return ToolPlan(tools, parsing, None)
    if has_user_constraint:
        raise bad_request("tool_choice 'required' or a named function cannot be combined with "
                          "grammar / json_schema / response_format", "tool_choice")
    allowed = [f for f in functions if forced is None or f["name"] == forced]
    parallel = parallel_tool_calls is not False and forced is None
    try:
        grammar = call_grammar(allowed, fmt, parallel, limits)
    except engine_api.GrammarLimitError as exc:  # too many / too large tools for the limits: the client's to fix
        raise bad_request(f"tools: {exc}", "tools") from None
    return ToolPlan(tools, parsing, grammar)
