"""Tool calling: reply parsers (Hermes/Qwen and Llama 3), streamed tool-call fragments, the
grammar that tool_choice "required" / a named function imposes, and the chat route end to end
over the fake engine (which replies with a fixed text)."""
from __future__ import annotations

import json

import pytest

from ggserve.engine.grammar.matcher import GrammarMatcher
from ggserve.engine.grammar.vocab import GrammarVocab
from ggserve.server.chat.tool_calls import (HERMES, LLAMA3, StreamingReplyParser, ToolParsing, detect_format,
                               parse_reply)
from ggserve.server.chat.tool_choice import call_grammar
from tests.server.fake_engine import CHATML, FakeEngine
from tests.server.helpers import fake_client, sse_json

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
NAMES = frozenset({"get_weather", "get_time"})
HERMES_PARSING = ToolParsing(HERMES, NAMES)
LLAMA3_PARSING = ToolParsing(LLAMA3, NAMES)
# a ChatML template that, like Qwen 2.5's, teaches the <tool_call> format when tools are given
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}. Reply with <tool_call></tool_call>"
    "<|im_end|>\n{% endif %}" + CHATML
)
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


# ---- format detection and parsing -----------------------------------------------------------------


def test_format_is_chosen_from_the_template_source():
    assert detect_format(HERMES_TEMPLATE) is HERMES
    llama31 = "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- '<|python_tag|>' }}"
    assert detect_format(llama31) is LLAMA3
    assert detect_format(CHATML) is HERMES  # no marker: the Hermes parser is the fallback


def test_hermes_single_call_has_null_content_and_a_json_string_arguments():
    message = parse_reply(PARIS_CALL, HERMES_PARSING)
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_hermes_several_calls_keep_text_before_them_and_get_distinct_ids():
    text = ("Let me look that up.\n" + PARIS_CALL + "\n"
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>')
    message = parse_reply(text, HERMES_PARSING)
    assert message["content"] == "Let me look that up."
    assert calls_of(message) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_hermes_fenced_or_bare_call_at_the_start_is_a_call():
    # what Qwen2.5-Coder-0.5B actually answers without a grammar
    fenced = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'
    assert calls_of(parse_reply(fenced, HERMES_PARSING)) == [("get_weather", {"city": "Paris"})]
    bare = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    assert calls_of(parse_reply(bare, HERMES_PARSING)) == [("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("text", [
    '{"name": "delete_everything", "arguments": {}}',  # not a listed tool: ordinary JSON
    '{"answer": 42}',
    'Use this JSON: {"name": "get_weather", "arguments": {"city": "Paris"}}',  # not at the start
    "```python\nprint('hi')\n```",
])
def test_ordinary_replies_stay_content(text):
    assert parse_reply(text, HERMES_PARSING) == {"role": "assistant", "content": text}


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',  # bad JSON
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    "<tool_call>\nnot json at all\n</tool_call>",
])
def test_malformed_calls_are_returned_as_content(text):
    assert parse_reply(text, HERMES_PARSING) == {"role": "assistant", "content": text}


def test_malformed_call_does_not_hide_a_later_good_one():
    text = "<tool_call>\n{oops}\n</tool_call>\n" + PARIS_CALL
    message = parse_reply(text, HERMES_PARSING)
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]
    assert message["content"] == "<tool_call>\n{oops}\n</tool_call>"


def test_llama3_calls_with_parameters_and_separators():
    text = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"type": "function", "name": "get_time", "parameters": {"tz": "UTC"}}')
    message = parse_reply(text, LLAMA3_PARSING)
    assert message["content"] is None
    assert calls_of(message) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    tagged = 'Calling.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}'
    message = parse_reply(tagged, LLAMA3_PARSING)
    assert message["content"] == "Calling." and calls_of(message) == [("get_weather", {"city": "Rome"})]


def test_no_tools_means_no_parsing():
    assert parse_reply(PARIS_CALL, ToolParsing()) == {"role": "assistant", "content": PARIS_CALL}


# ---- streaming ------------------------------------------------------------------------------------


def stream(text: str, parsing: ToolParsing, step: int = 1) -> list[dict]:
    parser = StreamingReplyParser(parsing)
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    return deltas + parser.finish()


def assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for frag in d.get("tool_calls", ()):
            if frag["index"] == len(calls):
                calls.append({"id": frag["id"], "name": frag["function"]["name"], "arguments": ""})
            calls[frag["index"]]["arguments"] += frag["function"].get("arguments", "")
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_fragments_rebuild_the_final_message(step):
    text = "Checking.\n" + PARIS_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    deltas = stream(text, HERMES_PARSING, step)
    assert all("<tool" not in d.get("content", "") for d in deltas)  # no tag text leaks
    content, calls = assemble(deltas)
    final = parse_reply(text, HERMES_PARSING)
    assert content == final["content"]
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in final["tool_calls"]]


def test_first_fragment_carries_id_type_name_and_empty_arguments():
    deltas = [d for d in stream(PARIS_CALL, HERMES_PARSING) if "tool_calls" in d]
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    rest = [d["tool_calls"][0] for d in deltas[1:]]
    assert len(rest) > 3  # the arguments arrive in pieces, as generated
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in rest)


def test_text_that_only_looks_like_a_tag_start_is_released():
    text = "a < b and x <tool but not a call"
    content, calls = assemble(stream(text, HERMES_PARSING))
    assert content == text and calls == []


def test_streamed_bare_json_that_is_not_a_call_is_content():
    text = '{"answer": 42, "note": "fine"}'
    content, calls = assemble(stream(text, HERMES_PARSING))
    assert content == text and calls == []


# ---- grammar for tool_choice required / named --------------------------------------------------


def full_match(grammar: str, text: str) -> bool:
    matcher = GrammarMatcher(grammar, GrammarVocab([b"x", b"</s>"], {1}))
    data = text.encode()
    if not matcher.accepts_bytes(data):
        return False
    matcher.accept_bytes(data)
    return matcher.is_complete


def test_required_grammar_accepts_exactly_valid_calls_in_the_model_format():
    functions = [WEATHER["function"], TIME["function"]]
    single = call_grammar(functions, HERMES, parallel=False)
    assert full_match(single, PARIS_CALL)
    assert full_match(single, '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
    assert not full_match(single, '<tool_call>\n{"name": "get_weather", "arguments": {"tz": "UTC"}}\n</tool_call>')
    assert not full_match(single, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')
    assert not full_match(single, "The weather is nice.")
    assert not full_match(single, PARIS_CALL + "\n" + PARIS_CALL)
    assert full_match(call_grammar(functions, HERMES, parallel=True), PARIS_CALL + "\n" + PARIS_CALL)
    llama = call_grammar([WEATHER["function"]], LLAMA3, parallel=False)
    assert full_match(llama, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert not full_match(llama, PARIS_CALL)


# ---- the chat route ---------------------------------------------------------------------------------


def tool_client(reply: str, **settings):
    return fake_client(FakeEngine(reply=reply), chat_template=HERMES_TEMPLATE, **settings)


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": QUESTION, **body})


def test_route_returns_tool_calls_and_finish_reason():
    with tool_client("Sure.\n" + PARIS_CALL) as client:
        r = chat(client, tools=[WEATHER])
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Sure."
        assert calls_of(choice["message"]) == [("get_weather", {"city": "Paris"})]
        prompt = client.engine.tokenizer.decode(client.engine.requests[-1].prompt_ids)
        assert "get_weather" in prompt  # the template saw the tools


def test_route_tool_choice_none_passes_no_tools_and_parses_nothing():
    with tool_client(PARIS_CALL) as client:
        r = chat(client, tools=[WEATHER], tool_choice="none")
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"] == {"role": "assistant", "content": PARIS_CALL}
        prompt = client.engine.tokenizer.decode(client.engine.requests[-1].prompt_ids)
        assert "get_weather" not in prompt


def test_route_required_and_named_choice_constrain_decoding():
    with tool_client(PARIS_CALL) as client:
        assert chat(client, tools=[WEATHER, TIME], tool_choice="required").status_code == 200
        grammar = client.engine.requests[-1].params.sampling.grammar
        assert full_match(grammar, PARIS_CALL) and not full_match(grammar, "It is sunny.")
        named = {"type": "function", "function": {"name": "get_time"}}
        assert chat(client, tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False).status_code == 200
        grammar = client.engine.requests[-1].params.sampling.grammar
        assert not full_match(grammar, PARIS_CALL)
        assert full_match(grammar, '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
        assert chat(client, tools=[WEATHER]).status_code == 200
        assert client.engine.requests[-1].params.sampling.grammar is None  # auto: free decoding


@pytest.mark.parametrize("body", [
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    {"tools": [WEATHER], "tool_choice": "sometimes"},
    {"tool_choice": "required"},
    {"tools": [{"type": "function", "function": {"description": "no name"}}]},
    {"tools": [WEATHER], "tool_choice": "required", "grammar": 'root ::= "x"'},
])
def test_route_rejects_bad_tool_requests(body):
    with tool_client(PARIS_CALL) as client:
        r = chat(client, **body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert client.engine.requests == []


def test_route_streams_tool_call_fragments():
    with tool_client("Sure.\n" + PARIS_CALL) as client:
        r = chat(client, tools=[WEATHER], stream=True)
        chunks = sse_json(r.text)
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert all("<tool" not in d.get("content", "") for d in deltas)
        content, calls = assemble([d for d in deltas if "role" not in d])
        assert content == "Sure."
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_route_streaming_without_tools_is_unchanged():
    with tool_client(PARIS_CALL) as client:
        chunks = sse_json(chat(client, stream=True).text)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == PARIS_CALL and chunks[-1]["choices"][0]["finish_reason"] == "stop"


UNIT = {"type": "function", "function": {"name": "convert", "parameters": {
    "type": "object", "properties": {"unit": {"$ref": "#/$defs/unit"}}, "required": ["unit"],
    "$defs": {"unit": {"type": "string", "enum": ["C", "F"]}}}}}


def test_tool_parameters_with_defs_are_constrained_where_they_are_placed():
    for functions in ([UNIT["function"]], [WEATHER["function"], UNIT["function"]]):
        grammar = call_grammar(functions, HERMES, parallel=False)
        assert full_match(grammar, '<tool_call>\n{"name": "convert", "arguments": {"unit": "C"}}\n</tool_call>')
        assert not full_match(grammar, '<tool_call>\n{"name": "convert", "arguments": {"unit": "K"}}\n</tool_call>')


def test_a_tool_schema_with_a_dangling_ref_is_a_400():
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    with fake_client() as client:
        for tool_choice in ("auto", "required"):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "tools": [broken], "tool_choice": tool_choice})
            assert r.status_code == 400 and "#/$defs/missing" in r.json()["error"]["message"], r.text


def test_the_call_grammar_uses_the_servers_grammar_limits():
    """--max-grammar-bytes covers the tool-call grammar too: a tight limit refuses it (400),
    the default lets it through."""
    functions = [WEATHER["function"], TIME["function"]]
    assert call_grammar(functions, HERMES, parallel=False)
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], "tool_choice": "required"}
    with fake_client(max_grammar_bytes=200) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "200 bytes" in r.json()["error"]["message"], r.text
    with fake_client(FakeEngine(n_ctx=4096)) as client:  # the tools make a long prompt
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert r.status_code == 200, r.text
