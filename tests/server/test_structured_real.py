"""Constrained and structured output from the real server with Qwen2.5-Coder-0.5B: GBNF grammars,
response_format JSON schemas, `n` seeded choices and tool calls (Hermes `<tool_call>` format,
picked from the model's template), through the official `openai` client and httpx.

Slow: one server process for the module (-np 4, -c 4096); requests are short and concurrent.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.helpers import running_server

pytestmark = pytest.mark.slow

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "is_student": {"type": "boolean"},
    },
    "required": ["name", "age", "is_student"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def base_url(qwen_path, tmp_path_factory):
    with running_server(qwen_path, tmp_path_factory.mktemp("server"), "-np", "4", "-c", "4096") as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=600, max_retries=0)


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """The subset of JSON-schema validation PERSON_SCHEMA needs (no jsonschema dependency)."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        errors = [f"{path}.{k}: missing" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{path}.{k}: not allowed" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
        return errors
    if kind == "string":
        ok = isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
        return [] if ok else [f"{path}: not a string of <= {schema.get('maxLength')} chars"]
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        return [] if ok else [f"{path}: not an integer in range"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: not a boolean"]
    raise ValueError(f"validator does not handle {schema}")


def test_schema_validator_rejects_what_it_should():
    good = {"name": "Ann", "age": 30, "is_student": False}
    assert schema_errors(good, PERSON_SCHEMA) == []
    for bad in ({"name": "Ann", "age": 30}, {**good, "age": "30"}, {**good, "age": 121}, {**good, "x": 1},
                {**good, "name": "A" * 17}, {**good, "is_student": 0}, [good]):
        assert schema_errors(bad, PERSON_SCHEMA)


def test_grammar_yes_no_on_native_completion(base_url):
    def ask(seed: int) -> str:
        body = {"prompt": "Question: is Paris in France?\nAnswer (yes or no):", "n_predict": 4,
                "temperature": 1.0, "seed": seed, "grammar": 'root ::= "yes" | "no"'}
        r = httpx.post(f"{base_url}/completion", json=body, timeout=600)
        assert r.status_code == 200
        return r.json()["content"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [1, 2, 3, 4]))
    assert all(a in ("yes", "no") for a in answers), answers


def test_response_format_json_schema_validates(oai):
    subjects = ["a student from Lyon", "a retired teacher", "a young painter", "a chess player", "a nurse",
                "a baker", "a pilot", "a child", "a farmer", "a software engineer"]

    def ask(i: int) -> str:
        r = oai.chat.completions.create(
            model="x", messages=[{"role": "user", "content": f"Describe {subjects[i]} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
            max_tokens=48, temperature=1.0, seed=100 + i,
        )
        assert r.choices[0].finish_reason == "stop"  # the grammar completed before max_tokens
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(10)))
    for reply in replies:
        assert schema_errors(json.loads(reply), PERSON_SCHEMA) == [], reply


def test_n_choices_are_seeded_and_reproducible(oai):
    kwargs = dict(model="x", messages=[{"role": "user", "content": "Invent a name for a cat."}],
                  n=3, temperature=1.0, seed=2024, max_tokens=8)
    first = oai.chat.completions.create(**kwargs)
    second = oai.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    contents = [c.message.content for c in first.choices]
    assert all(contents) and contents == [c.message.content for c in second.choices]
    assert len(set(contents)) >= 2  # each choice has its own seed (seed + index)
    single = oai.chat.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].message.content == contents[0]  # choice 0 keeps the request's seed
    assert 3 <= first.usage.completion_tokens <= 3 * 8  # all choices' tokens
    assert first.usage.prompt_tokens == second.usage.prompt_tokens < 40  # the prompt counted once


def _assert_paris_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    args = json.loads(arguments)
    assert isinstance(args, dict) and "paris" in str(args.get("city", "")).lower(), args


def test_tool_call_non_stream(oai):
    r = oai.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL],
                                    max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    _assert_paris_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_tool_call_stream(oai, tool_choice):
    chunks = list(oai.chat.completions.create(
        model="x", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=tool_choice,
        max_tokens=48, temperature=0, stream=True,
    ))
    name, arguments, content = None, "", ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for fragment in delta.tool_calls or ():
            assert fragment.index == 0
            if fragment.function.name:
                assert name is None and fragment.id.startswith("call_")
                name = fragment.function.name
            arguments += fragment.function.arguments or ""
    assert "<tool_call>" not in content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    _assert_paris_call(name, arguments)
