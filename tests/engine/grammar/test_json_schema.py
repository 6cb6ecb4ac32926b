"""JSON schema -> GBNF: generated grammars accept valid instances and reject invalid ones.

Each instance is run through the incremental matcher byte by byte (via accepts_bytes), so
these tests cover the converter, the parser and the matcher together.
"""
from __future__ import annotations

import json

import pytest

from ggserve.engine.grammar.gbnf import GrammarError, parse_grammar
from ggserve.engine.grammar.compiled import CompiledGrammar
from ggserve.engine.grammar.matcher import GrammarMatcher
from ggserve.engine.grammar.vocab import GrammarVocab
from ggserve.engine.grammar.json_schema import json_object_grammar, json_schema_to_grammar

VOCAB = GrammarVocab([b"x"])


def matches(grammar: str | CompiledGrammar, text: str) -> bool:
    matcher = GrammarMatcher(grammar, VOCAB)
    data = text.encode()
    if not matcher.accepts_bytes(data):
        return False
    matcher.accept_bytes(data)
    return matcher.is_complete


def check(schema, good, bad):
    grammar = json_schema_to_grammar(schema)
    parse_grammar(grammar)
    for doc in good:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        assert matches(grammar, text), f"should accept {text}\n{grammar}"
    for doc in bad:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        assert not matches(grammar, text), f"should reject {text}\n{grammar}"


def test_required_and_optional_properties():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "email": {"type": "string"}, "admin": {"type": "boolean"}},
              "required": ["name", "age"]}
    check(schema,
          good=[{"name": "a", "age": 1}, {"name": "a", "age": 1, "admin": True},
                {"name": "a", "age": 1, "email": "e", "admin": False}, '{ "name" : "x" , "age" : -3 }',
                '{\n  "name": "x",\n  "age": 0\n}'],
          bad=[{"name": "a"}, {"age": 1, "name": "a"}, {"name": "a", "age": 1.5},
               {"name": "a", "age": 1, "admin": True, "email": "e"},  # optional ones keep schema order
               {"name": "a", "age": 1, "other": 1}, '{"name": "a", "age": 01}'])


def test_enum_and_const():
    check({"enum": ["red", "green", 3, None]}, good=['"red"', "3", "null"], bad=['"blue"', "4", '"RED"'])
    check({"const": {"a": [1, "x"]}}, good=[{"a": [1, "x"]}], bad=[{"a": [1]}, {"a": [1, "y"]}])


def test_nested_objects_and_arrays_with_bounds():
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                  "required": ["x", "y"]}}, "required": ["tags", "point"]}
    check(schema,
          good=[{"tags": ["a"], "point": {"x": 1, "y": -2.5e3}}, {"tags": ["a", "b", "c"], "point": {"x": 0.5, "y": 1}}],
          bad=[{"tags": [], "point": {"x": 1, "y": 2}}, {"tags": ["a", "b", "c", "d"], "point": {"x": 1, "y": 2}},
               {"tags": ["a"], "point": {"x": 1}}, {"tags": [1], "point": {"x": 1, "y": 2}}])


def test_array_without_min_and_exact_tuple():
    check({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, good=["[]", "[1]", "[1, 2]"], bad=["[1,2,3]"])
    check({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
          good=['["a", 1]'], bad=['["a"]', '[1, "a"]', '["a", 1, 2]'])


def test_refs_to_defs_including_recursion():
    schema = {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/node"}
    check(schema, good=[{"value": 1}, {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}]}],
          bad=[{"children": []}, {"value": 1, "children": [{"value": "x"}]}])
    check({"definitions": {"n": {"type": "null"}}, "properties": {"a": {"$ref": "#/definitions/n"}}},
          good=["{}", '{"a": null}'], bad=['{"a": 1}'])


def test_any_of_one_of_and_type_lists():
    check({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, good=["5", '"ab"'], bad=['"abc"', "true"])
    check({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, good=["true", "null"], bad=["0"])
    check({"type": ["number", "null"]}, good=["1.5", "null"], bad=['"1"'])


def test_additional_properties():
    base = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    check(base, good=['{"a": 1}'], bad=['{"a": 1, "b": 2}'])
    check({**base, "additionalProperties": True}, good=['{"a": 1, "b": [true], "c": {}}'], bad=['{"b": 2}'])
    check({**base, "additionalProperties": {"type": "string"}}, good=['{"a": 1, "b": "x"}'], bad=['{"a": 1, "b": 2}'])


def test_string_formats_and_lengths():
    check({"type": "string", "format": "date"}, good=['"2024-02-29"'], bad=['"2024-13-01"', '"24-01-01"'])
    check({"type": "string", "format": "time"}, good=['"12:30:00Z"', '"23:59:59.123+02:00"'], bad=['"24:00:00Z"'])
    check({"type": "string", "format": "date-time"}, good=['"2024-01-02T03:04:05Z"'], bad=['"2024-01-02 03:04:05Z"'])
    check({"type": "string", "format": "uuid"}, good=['"123e4567-e89b-12d3-a456-426614174000"'], bad=['"123e4567"'])
    check({"type": "string", "minLength": 2, "maxLength": 3}, good=['"ab"', '"a\\"c"', '"日本語"'], bad=['"a"', '"abcd"'])


def test_strings_escape_rules():
    check({"type": "string"}, good=['"a\\nb"', '"\\u00e9"', '"é"'], bad=['"a\nb"', '"\\x"', '"unterminated'])


def test_json_object_mode_accepts_any_object_only():
    grammar = json_object_grammar()
    assert matches(grammar, '{"a": [1, {"b": null}], "c": "d"}')
    assert not matches(grammar, "[1, 2]")
    assert not matches(grammar, '"text"')


def test_bare_object_type_is_any_object():
    check({"type": "object"}, good=['{"a": 1, "b": {"c": []}}', "{}"], bad=["[]", "1"])


def test_empty_schema_is_any_value():
    grammar = json_schema_to_grammar({})
    for text in ['1', '"x"', '[{"a": false}]', "null"]:
        assert matches(grammar, text)


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^a+$"},
    {"type": "number", "minimum": 0},
    {"type": "integer", "minimum": 1.5},
    {"type": "integer", "minimum": 5, "maximum": 4},
    {"allOf": [{"type": "string"}]},
    {"type": "string", "format": "email"},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": "#/$defs/missing"},
    {"type": "tuple"},
    {"type": "array", "minItems": 3, "maxItems": 1},
    False,
])
def test_unsupported_or_invalid_schemas_raise(schema):
    with pytest.raises(GrammarError):
        json_schema_to_grammar(schema)


@pytest.mark.parametrize("bounds,lo,hi", [
    ({"minimum": 0}, 0, None), ({"maximum": 0}, None, 0), ({"minimum": -5, "maximum": 17}, -5, 17),
    ({"exclusiveMinimum": 11, "exclusiveMaximum": 988}, 12, 987), ({"minimum": -150, "maximum": -7}, -150, -7),
    ({"minimum": 3, "maximum": 3}, 3, 3), ({"minimum": 100}, 100, None),
])
def test_integer_bounds(bounds, lo, hi):
    grammar = CompiledGrammar(parse_grammar(json_schema_to_grammar({"type": "integer", **bounds})))
    for value in list(range(-1100, 1100, 3)) + [10**12, -(10**12), 123456789]:
        expected = (lo is None or value >= lo) and (hi is None or value <= hi)
        assert matches(grammar, str(value)) == expected, value
    assert not matches(grammar, "01")


def test_annotations_are_ignored():
    schema = {"title": "T", "description": "d", "type": "integer", "default": 3, "examples": [1]}
    check(schema, good=["3"], bad=['"3"'])
