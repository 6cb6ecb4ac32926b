"""GBNF parsing, incremental matching and token masks with toy vocabularies."""
from __future__ import annotations

import numpy as np
import pytest

from ggserve.engine.grammar.gbnf import GrammarError, parse_grammar
from ggserve.engine.grammar.matcher import GrammarMatcher
from ggserve.engine.grammar.vocab import GrammarVocab
from ggserve.engine.sampling.sampler import Sampler, SamplingParams

EOS = 99


def vocab_of(pieces: list[bytes]) -> GrammarVocab:
    # ids 0..n-1 are the pieces; id EOS is the end-of-generation token
    tokens = list(pieces) + [b""] * (EOS - len(pieces)) + [b"</s>"]
    return GrammarVocab(tokens, {EOS})


def full_match(grammar: str, text: str | bytes) -> bool:
    matcher = GrammarMatcher(grammar, vocab_of([b"x"]))
    data = text.encode() if isinstance(text, str) else text
    if not matcher.accepts_bytes(data):
        return False
    matcher.accept_bytes(data)
    return matcher.is_complete


def allowed(matcher: GrammarMatcher, pieces: list[bytes]) -> set[bytes]:
    mask = matcher.allowed_mask()
    names = {i: p for i, p in enumerate(pieces)}
    names[EOS] = b"<EOS>"
    return {names[i] for i in np.flatnonzero(mask)}


# -- parse errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ('answer ::= "yes"', "root"),
    ('root ::= item\n', "undefined rule 'item'"),
    ('root ::= "a" )', "line 1, column 14"),
    ('root ::= "a"\nfoo ::= "b" ]', "line 2"),
    ('root ::= "abc', "unterminated"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= root "a" | "b"', "left recursion"),
    ('root ::= x\nx ::= ("" | "c") x "a" | "b"', "left recursion"),
    ('root ::= <[42]>', "token"),
    ('root ::= "a"{3,1}', "below the minimum"),
    ('root ::= *', "before a repetition"),
    ('root ::= [a-', "unterminated"),
    ('', "empty"),
    ('root = "a"', "'::='"),
])
def test_invalid_grammars_raise_with_position(text, message):
    with pytest.raises(GrammarError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_grammar(text)


def test_grammar_error_is_a_value_error():
    assert issubclass(GrammarError, ValueError)


def test_comments_groups_and_multiline_alternatives():
    grammar = '''
# a comment line
root ::= greeting ( " " name )?   # trailing comment
greeting ::= "hi" |
    "hello"
name ::= (
  "bob" | "alice"
)
'''
    assert full_match(grammar, "hello alice")
    assert full_match(grammar, "hi")
    assert not full_match(grammar, "hi carol")


# -- matching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grammar,good,bad", [
    ('root ::= "a"{2,3}', ["aa", "aaa"], ["a", "aaaa", ""]),
    ('root ::= "a"{2}', ["aa"], ["a", "aaa"]),
    ('root ::= "a"{2,} "b"', ["aab", "aaaaab"], ["ab", "aa"]),
    ('root ::= "a"{0,1} "b"', ["b", "ab"], ["aab"]),
    ('root ::= ("ab")* "c"', ["c", "ababc"], ["abac", "ab"]),
    ('root ::= [0-9]+ ("." [0-9]+)?', ["1", "12.5"], ["1.", ".5", "a"]),
    ('root ::= "x"? "y"', ["y", "xy"], ["xxy"]),
    ('root ::= [^a-c]', ["d", "é", "z"], ["a", "b", "c", "dd"]),
    ('root ::= [\\]\\-] [\\x41-\\x43] "\\u00e9"', ["]Aé", "-Cé"], ["]Dé", "aAé"]),
    ('root ::= . "!"', ["a!", "日!"], ["!", "ab!"]),
    ('root ::= [α-ω]+ "\\n"', ["αβγ\n"], ["abc\n", "αβ"]),
])
def test_grammar_accepts_and_rejects(grammar, good, bad):
    for text in good:
        assert full_match(grammar, text), text
    for text in bad:
        assert not full_match(grammar, text), text


def test_yes_no_masking_with_toy_vocab():
    pieces = [b"yes", b"no", b"y", b"es", b"n", b"o", b"x", b"ye", b"yesno"]
    matcher = GrammarMatcher('root ::= "yes" | "no"', vocab_of(pieces))
    assert allowed(matcher, pieces) == {b"yes", b"no", b"y", b"n", b"ye"}
    matcher.accept_token(pieces.index(b"y"))
    assert allowed(matcher, pieces) == {b"es"}
    matcher.accept_token(pieces.index(b"es"))
    assert allowed(matcher, pieces) == {b"<EOS>"}
    with pytest.raises(GrammarError):
        matcher.accept_token(pieces.index(b"x"))


def test_eog_allowed_only_when_grammar_can_complete():
    pieces = [b"a", b"b", b"ab"]
    matcher = GrammarMatcher('root ::= "a" "b"?', vocab_of(pieces))
    assert b"<EOS>" not in allowed(matcher, pieces)
    with pytest.raises(GrammarError):
        matcher.accept_token(EOS)
    matcher.accept_token(0)
    assert allowed(matcher, pieces) == {b"b", b"<EOS>"}


def test_utf8_split_across_tokens():
    # é = C3 A9, è = C3 A8, α = CE B1, Ω = CE A9 (outside [α-ω])
    pieces = [b"\xc3", b"\xa9", b"\xa8", b"\xc3\xa9", b"\xce", "α".encode(), b"\xb1", b"\xb1!", b"!"]
    matcher = GrammarMatcher('root ::= "é" [α-ω] "!"?', vocab_of(pieces))
    assert allowed(matcher, pieces) == {b"\xc3", b"\xc3\xa9"}
    matcher.accept_token(0)  # first half of é
    assert allowed(matcher, pieces) == {b"\xa9"}
    matcher.accept_token(1)
    assert allowed(matcher, pieces) == {b"\xce", "α".encode()}
    matcher.accept_token(4)  # first half of α (or Ω)
    assert not matcher.is_complete
    assert allowed(matcher, pieces) == {b"\xb1", b"\xb1!"}
    matcher.accept_token(6)
    assert matcher.is_complete
    assert allowed(matcher, pieces) == {b"!", b"<EOS>"}


def test_invalid_utf8_and_empty_tokens_are_never_allowed():
    pieces = [b"\xff", b"", b"\x00a", b"a"]
    matcher = GrammarMatcher("root ::= [^z]*", vocab_of(pieces))
    assert allowed(matcher, pieces) == {b"a", b"<EOS>"}


def test_mask_trie_and_permissive_paths_agree_with_single_checks():
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"b", b'"', b"\\", b"1", b" ", "é".encode(), b"\xc3"]
    pieces = list({b"".join(rng.choice(alphabet, size=rng.integers(1, 5))) for _ in range(80)})
    grammar = 'root ::= "\\"" ( [^"\\\\] | "\\\\" ["\\\\] )* "\\"" [ ]? [0-9]*'
    matcher = GrammarMatcher(grammar, vocab_of(pieces))
    for step in range(6):
        mask = matcher.allowed_mask()
        for token_id in range(len(pieces)):
            assert mask[token_id] == matcher.token_allowed(token_id), (step, pieces[token_id])
        choices = np.flatnonzero(mask[:len(pieces)])
        if choices.size == 0:
            break
        matcher.accept_token(int(rng.choice(choices)))


def test_sampler_follows_grammar_even_against_logits():
    pieces = [b"yes", b"no", b"maybe", b"y", b"es"]
    vocab = vocab_of(pieces)
    sampler = Sampler(SamplingParams(temperature=0.0, grammar='root ::= "yes" | "no"', seed=1), EOS + 1,
                      frozenset({EOS}), vocab)
    logits = np.zeros(EOS + 1, np.float32)
    logits[2] = 10.0  # the model wants "maybe"
    logits[3] = 5.0   # then "y"
    logits[EOS] = 8.0  # and to stop early
    out = []
    for _ in range(5):
        token = sampler.sample(logits)
        out.append(token)
        if token == EOS:
            break
    assert out == [3, 4, EOS]


def test_sampler_grammar_needs_token_bytes():
    with pytest.raises(ValueError):
        Sampler(SamplingParams(grammar='root ::= "a"'), 10)


def test_sampler_accepts_plain_token_bytes_list():
    pieces = [b"a", b"b"] + [b""] * (EOS - 2) + [b"</s>"]
    sampler = Sampler(SamplingParams(temperature=0.0, grammar='root ::= "b"'), EOS + 1, frozenset({EOS}), pieces)
    assert sampler.sample(np.arange(EOS + 1, dtype=np.float32)[::-1].copy()) == 1


def test_mask_after_a_token_ending_mid_character():
    pieces = [b"\xe6", b"\x97", b"\xa5", b"\x97\xa5", "日".encode(), b"a", b"\x97a"]
    matcher = GrammarMatcher('root ::= "日"+', vocab_of(pieces))
    matcher.accept_token(0)  # first byte of 日 (E6 97 A5)
    assert allowed(matcher, pieces) == {b"\x97", b"\x97\xa5"}
    matcher.accept_token(1)
    assert allowed(matcher, pieces) == {b"\xa5"}
    matcher.accept_token(2)
    assert allowed(matcher, pieces) == {b"\xe6", "日".encode(), b"<EOS>"}


def test_invalid_grammar_rejected_when_params_are_built():
    with pytest.raises(ValueError, match="undefined rule 'x'"):
        SamplingParams(grammar="root ::= x")
    assert SamplingParams(grammar="").parsed_grammar is None


def test_rule_body_on_next_line_and_underscore_names():
    grammar = 'root ::=\n  my_item ("," my_item)*\nmy_item ::= [a-z]+'
    assert full_match(grammar, "ab,c")
    assert not full_match(grammar, "ab,")


def test_requests_with_the_same_grammar_share_tables_but_not_state():
    pieces = [b"yes", b"no", b"y", b"es"]
    vocab = vocab_of(pieces)
    params = SamplingParams(temperature=0.0, grammar='root ::= "yes" | "no"')
    first, second = (Sampler(params, EOS + 1, frozenset({EOS}), vocab) for _ in range(2))
    assert first.grammar.tables is second.grammar.tables
    logits = np.zeros(EOS + 1, np.float32)
    logits[2] = 1.0
    assert first.sample(logits) == 2  # "y": the first request moves on
    assert second.grammar.allowed_mask()[0] and not first.grammar.allowed_mask()[0]
    # a cached (bit-packed) mask reads back identical
    np.testing.assert_array_equal(first.grammar.allowed_mask(), first.grammar.allowed_mask())
