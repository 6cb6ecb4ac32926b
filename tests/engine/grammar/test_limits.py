"""Grammar limits: oversized, too deeply nested, dangling-reference or impossible grammars and
schemas fail at once with a GrammarError (HTTP 400) instead of a RecursionError or a stall.

Time bounds here are only there to catch hangs (they are ~100x what this needs on one core);
where possible a test shows that the check comes before any expensive work instead.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from ggserve.engine.grammar.compiled import CompiledGrammar
from ggserve.engine.grammar.gbnf import GrammarError, GrammarLimitError, parse_grammar
from ggserve.engine.grammar.json_schema import json_schema_to_grammar
from ggserve.engine.grammar.limits import GrammarLimits
from ggserve.engine.grammar.masks import tables_for
from ggserve.engine.grammar.matcher import GrammarMatcher
from ggserve.engine.grammar.schema_refs import SchemaReferenceError, rebase_refs
from ggserve.engine.grammar.vocab import GrammarVocab
from ggserve.engine.sampling.sampler import Sampler, SamplingParams
from tests.testdata import reference_data_dir

EOS = 99
HANG = 30.0  # seconds: only a hang (or a quadratic blow-up) gets near this


def vocab_of(pieces: list[bytes]) -> GrammarVocab:
    return GrammarVocab(list(pieces) + [b""] * (EOS - len(pieces)) + [b"</s>"], {EOS})


def full_match(grammar, text: str) -> bool:
    matcher = GrammarMatcher(grammar, vocab_of([b"x"]))
    data = text.encode()
    if not matcher.accepts_bytes(data):
        return False
    matcher.accept_bytes(data)
    return matcher.is_complete


def nested_items(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# -- GrammarLimits ------------------------------------------------------------------------------
def test_limits_are_frozen_and_validated():
    limits = GrammarLimits()
    assert limits.max_grammar_bytes == 256 << 10 and limits.max_nesting == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_rules = 1  # type: ignore[misc]
    for bad in ({"max_rules": 0}, {"max_elements": -5}, {"max_nesting": True}, {"max_grammar_bytes": 1.5},
                {"max_nesting": 10_000}):
        with pytest.raises(ValueError):
            GrammarLimits(**bad)
    assert GrammarLimits(max_rules=7).max_rules == 7


def test_limits_travel_with_the_grammar():
    limits = GrammarLimits(max_match_work=1234)
    grammar = parse_grammar('root ::= "a"', limits=limits)
    assert grammar.limits is limits and CompiledGrammar(grammar).limits is limits
    assert parse_grammar('root ::= "a"').limits == GrammarLimits()


# -- nesting ------------------------------------------------------------------------------------
def test_deeply_nested_groups_are_a_clean_error():
    with pytest.raises(GrammarLimitError, match="nested deeper than 100 levels") as info:
        parse_grammar("root ::= " + "(" * 5000 + '"a"' + ")" * 5000)
    assert isinstance(info.value, ValueError)
    assert full_match("root ::= " + "(" * 100 + '"a"' + ")" * 100, "a")
    with pytest.raises(GrammarLimitError, match="nested deeper than 3 levels"):
        parse_grammar('root ::= (((("a"))))', limits=GrammarLimits(max_nesting=3))


@pytest.mark.parametrize("schema", [
    nested_items(450),
    {"type": "object", "properties": {"a": nested_items(450)}},
    {"anyOf": [nested_items(5000)]},
    {"const": nested_items(200)},  # data nests too
])
def test_deeply_nested_json_schemas_are_a_clean_error(schema):
    with pytest.raises(GrammarLimitError, match="nested deeper than 100 levels"):
        json_schema_to_grammar(schema)


def test_deep_json_schema_text_is_a_clean_error():
    with pytest.raises(GrammarLimitError, match="nested deeper"):
        json_schema_to_grammar('{"items": ' * 100_000 + "{}" + "}" * 100_000)


def test_moderately_nested_schemas_still_work():
    grammar = json_schema_to_grammar(nested_items(40))
    assert full_match(grammar, "[" * 40 + "1" + "]" * 40)
    assert not full_match(grammar, "[" * 39 + "1" + "]" * 39)


def test_ref_chains_count_as_nesting():
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(300)}
    defs["d300"] = {"type": "integer"}
    with pytest.raises(GrammarLimitError, match="nested deeper than 100 levels"):
        json_schema_to_grammar({"$defs": defs, "$ref": "#/$defs/d0"})
    short = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(20)}
    assert full_match(json_schema_to_grammar({"$defs": {**short, "d20": {"type": "integer"}}, "$ref": "#/$defs/d0"}),
                      "42")


def test_long_rule_chains_are_not_nesting():
    # rules referring to rules (not groups in groups) are flat text: they parse and match
    # without recursion, however long the chain
    n = 5000
    text = "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x"\n' for i in range(n)) + f'r{n} ::= "y"\n'
    assert full_match(text, "y" + "x" * n)
    assert not full_match(text, "y" + "x" * (n - 1))
    looped = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= r0 | "y"\n'
    with pytest.raises(GrammarError, match="left recursion"):
        parse_grammar(looped)


# -- size ---------------------------------------------------------------------------------------
def test_oversized_grammar_text_is_refused_before_parsing():
    # the syntax error at the start is never reached: the size is checked first
    with pytest.raises(GrammarLimitError, match="longer than 262144 bytes"):
        parse_grammar("root ::= )" + " " * (256 << 10))
    big = "root ::= " + " | ".join(f'"w{i}"' for i in range(120_000))
    start = time.perf_counter()
    with pytest.raises(GrammarLimitError):
        parse_grammar(big)
    assert time.perf_counter() - start < HANG
    with pytest.raises(GrammarLimitError, match="longer than 50 bytes"):
        parse_grammar('root ::= "' + "é" * 20 + '"', limits=GrammarLimits(max_grammar_bytes=50))  # 49 chars


@pytest.mark.parametrize("text,limits,message", [
    ('root ::= "a"{0,100}', GrammarLimits(max_rules=50), "more than 50 rules"),
    ("root ::= " + " | ".join(f'"{i}"' for i in range(11)), GrammarLimits(max_alternatives=10), "10 alternatives"),
    ('root ::= "' + "a" * 1000 + '"{2000}', GrammarLimits(), "1000000 elements"),  # 2M copies
    ('root ::= "' + "a" * 600 + '"{0,1000} "' + "b" * 600 + '"{0,1000}', GrammarLimits(), "elements"),
    ('root ::= "a"{2001}', GrammarLimits(), "repetition count exceeds 2000"),
])
def test_expansion_limits(text, limits, message):
    with pytest.raises(GrammarError, match=message):
        parse_grammar(text, limits=limits)


def test_grammars_at_the_limits_parse_and_compile_quickly():
    grammars = [
        "root ::= " + " | ".join(f'"w{i}"' for i in range(24_000)),  # ~247 KiB of alternatives
        "root ::= " + " | ".join(f'"{chr(0x100 + 2 * i)}x"' for i in range(25_000)),  # 50,000 char classes
        "root ::= " + " ".join("[a-z]{0,2000}" for _ in range(49)),  # 98,000 helper rules
    ]
    vocab = vocab_of([b"w", b"w1", b"12", "\u0100".encode(), b"x", b"ab", b"a"])
    for text in grammars:
        assert len(text.encode()) <= 256 << 10
        start = time.perf_counter()
        matcher = GrammarMatcher(CompiledGrammar(parse_grammar(text)), vocab)
        assert matcher.allowed_mask().any()
        assert time.perf_counter() - start < HANG


def test_json_schema_grammar_size_is_limited():
    schema = {"enum": [f"value number {i}" for i in range(20_000)]}
    with pytest.raises(GrammarLimitError, match="longer than 262144 bytes"):
        json_schema_to_grammar(schema)
    small = GrammarLimits(max_grammar_bytes=2000)
    with pytest.raises(GrammarLimitError, match="longer than 2000 bytes"):
        json_schema_to_grammar({"enum": [f"v{i}" for i in range(500)]}, limits=small)
    assert json_schema_to_grammar({"enum": ["a", "b"]}, limits=small)


def test_many_optional_properties_convert_without_recursion():
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)}}
    grammar = json_schema_to_grammar(schema, limits=GrammarLimits(max_grammar_bytes=1 << 22))
    assert full_match(GrammarMatcher(grammar, vocab_of([b"x"])).compiled, '{"p3": 1, "p1400": 2}')


# -- $ref ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [
    {"$ref": "#/$defs/missing"},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "$defs": {"other": {}}},
    {"$defs": {"unused": {"$ref": "#/$defs/missing"}}, "type": "integer"},  # checked even if unused
])
def test_dangling_refs_are_named(schema):
    with pytest.raises(SchemaReferenceError, match="'#/\\$defs/missing' does not resolve") as info:
        json_schema_to_grammar(schema)
    assert isinstance(info.value, ValueError)


def test_ref_like_data_is_not_a_reference():
    grammar = json_schema_to_grammar({"const": {"$ref": "#/nowhere"}})
    assert full_match(grammar, '{"$ref": "#/nowhere"}')


def test_refs_into_arrays_and_the_root():
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert full_match(json_schema_to_grammar(tree), '{"kids": [{}, {"kids": []}]}')
    pair = {"prefixItems": [{"type": "integer"}, {"$ref": "#/prefixItems/0"}]}
    assert full_match(json_schema_to_grammar(pair), "[1, 2]")


def test_rebase_refs_embeds_a_schema_with_its_own_defs():
    parameters = {"type": "object", "properties": {"when": {"$ref": "#/$defs/day"}}, "required": ["when"],
                  "$defs": {"day": {"enum": ["mon", "tue"]}}}
    call = {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": "f"}, "arguments": rebase_refs(parameters, "#/properties/arguments")}}
    assert parameters["properties"]["when"]["$ref"] == "#/$defs/day"  # the original is untouched
    grammar = json_schema_to_grammar(call)
    assert full_match(grammar, '{"name": "f", "arguments": {"when": "tue"}}')
    assert not full_match(grammar, '{"name": "f", "arguments": {"when": "sun"}}')
    with pytest.raises(SchemaReferenceError, match="'#/\\$defs/nope'"):
        rebase_refs({"$ref": "#/$defs/nope"}, "#/properties/arguments")


# -- matching cost ------------------------------------------------------------------------------
def exponential_grammar(depth: int) -> str:
    # every level doubles the ways to reach "x": 2**depth live parse stacks
    rules = [f"r{i} ::= r{i + 1}? r{i + 1}?" for i in range(depth)]
    return "\n".join(["root ::= r0", *rules, f'r{depth} ::= "x"'])


def test_ambiguous_grammar_hits_the_work_limit_instead_of_stalling():
    limits = GrammarLimits(max_match_work=100_000)
    start = time.perf_counter()
    with pytest.raises(GrammarLimitError, match="too complex"):
        CompiledGrammar(parse_grammar(exponential_grammar(40), limits=limits))
    assert time.perf_counter() - start < HANG
    assert full_match(parse_grammar(exponential_grammar(4), limits=limits), "x" * 16)


def test_work_limit_applies_to_each_mask():
    vocab = vocab_of([b"x", b"xx", b"y"])
    text = 'root ::= "x" (' + " | ".join(f"[{chr(0x100 + i)}]" for i in range(300)) + ")"
    matcher = GrammarMatcher(parse_grammar(text, limits=GrammarLimits(max_match_work=200)), vocab)
    with pytest.raises(GrammarLimitError, match="more than 200"):  # 300 stacks after "x"
        matcher.allowed_mask()
    assert GrammarMatcher(text, vocab).allowed_mask()[0]  # fine at the default


def test_big_states_give_the_same_masks_as_single_checks():
    # > 16 live stacks: the class index and the partial-character cover are used
    alternatives = [f'"{a}{b}"' for a in "ab\u00e9\u65e5" for b in "ab1\u65e5 "]
    alternatives += ['[^a] "1"', '. "a"', '[a-z\u00e0-\u00ff] "b"', '[^\u00e9\u65e5] [^ ]', '"\U0001F600"']
    text = "root ::= (" + " | ".join(alternatives) + ")+"
    rng = np.random.default_rng(1)
    alphabet = [b"a", b"b", b"1", b" ", "\u00e9".encode(), "\u65e5".encode(), b"\xc3", b"\xe6\x97", b"\xf0\x9f"]
    pieces = list(dict.fromkeys(b"".join(rng.choice(alphabet, size=rng.integers(1, 4))) for _ in range(90)))
    matcher = GrammarMatcher(text, vocab_of(pieces))
    for _ in range(8):
        mask = matcher.allowed_mask()
        for token_id in range(len(pieces)):
            assert mask[token_id] == matcher.token_allowed(token_id), pieces[token_id]
        choices = np.flatnonzero(mask[:len(pieces)])
        if choices.size == 0:
            break
        matcher.accept_token(int(rng.choice(choices)))


# -- a grammar no token can start ---------------------------------------------------------------
def test_impossible_grammar_fails_when_the_request_is_built():
    vocab = vocab_of([b"a", b"b", b"ab"])
    for text in ["root ::= [\\x00-\\x08]", 'root ::= "c" | "d"', "root ::= [^\\x00-\\U0010FFFF]"]:
        with pytest.raises(GrammarError, match="allows no token"):
            Sampler(SamplingParams(grammar=text), EOS + 1, frozenset({EOS}), vocab)
        assert text not in vocab.grammar_cache
    sampler = Sampler(SamplingParams(grammar='root ::= "c"?'), EOS + 1, frozenset({EOS}), vocab)  # EOS only
    assert sampler.grammar.allowed_mask()[EOS]


def test_impossible_grammar_on_a_real_vocabulary():
    path = reference_data_dir() / "vocab" / "ggml-vocab-bert-bge.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (llama.cpp's vocab test data; set GGSERVE_TESTDATA)")
    from ggserve.engine import GGUFFile, Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile(str(path)))
    vocab = GrammarVocab([tokenizer.token_to_piece(i, special=True) for i in range(tokenizer.n_vocab)],
                         tokenizer.eog_ids)
    for text in ["root ::= [\\x01-\\x08]+", 'root ::= "\\u0378" [a-z]*']:  # no token has these
        start = time.perf_counter()
        with pytest.raises(GrammarError, match="allows no token"):
            tables_for(vocab, text, parse_grammar(text))
        assert time.perf_counter() - start < HANG
    assert tables_for(vocab, "root ::= [a-z]+", parse_grammar("root ::= [a-z]+")).mask(0, (0, 0)).any()
