"""Stop strings and EOS on detokenized text: hold-back across token boundaries, nothing after a stop."""
from __future__ import annotations

from tests.engine.fakes import EOS_ID, TOKEN, FakeDetokenizer, FakeTokenizer

from ggserve.engine.request import StopType
from ggserve.engine.stop import StopChecker, find_stop, partial_stop_len


def checker(stop, ignore_eos=False, special=False):
    tok = FakeTokenizer()
    return StopChecker(FakeDetokenizer(tok, special=special), stop, tok.is_eog, ignore_eos)


def feed(c: StopChecker, pieces: list[str]):
    return [c.add(TOKEN[p]) for p in pieces]


def test_partial_stop_len_is_longest_suffix_that_prefixes_a_stop():
    assert partial_stop_len("abc ST", ["STOP"]) == 2
    assert partial_stop_len("abc S", ["STOP", "xyz"]) == 1
    assert partial_stop_len("abc", ["STOP"]) == 0
    assert partial_stop_len("a</", ["</a>", "/"]) == 2  # "/" is a full word, not a proper prefix
    assert find_stop("x STOP y STOP", ["STOP", "y"]) == (2, "STOP")
    assert find_stop("x y STOP", ["STOP", "y"]) == (2, "y")


def test_stop_string_split_over_two_tokens_is_held_back_then_dropped():
    c = checker(["STOP"])
    results = feed(c, ["a", "b", " ", "ST", "OP", "c"][:5])
    assert [r.text for r in results] == ["a", "b", " ", "", ""]
    assert results[-1].stop_type is StopType.WORD and results[-1].stopping_word == "STOP"
    assert c.text == "ab "


def test_held_back_prefix_is_released_when_it_does_not_complete():
    c = checker(["STOP"])
    results = feed(c, ["ST", "x", "ST"])
    assert [r.text for r in results] == ["", "STx", ""]
    assert all(r.stop_type is StopType.NONE for r in results)
    assert c.flush() == "ST"  # generation ended for another reason: the tail is real text
    assert c.text == "STxST"


def test_stop_inside_one_token_cuts_the_text_before_it():
    c = checker(["b"])
    r = feed(c, ["a", "STOP"])  # no "b": nothing stops
    assert [x.text for x in r] == ["a", "STOP"]
    c = checker(["TO"])
    r = c.add(TOKEN["STOP"])
    assert (r.text, r.stop_type, r.stopping_word) == ("S", StopType.WORD, "TO")


def test_earliest_of_several_stop_strings_wins():
    c = checker(["OP", "ST"])
    r = c.add(TOKEN["STOP"])
    assert (r.text, r.stopping_word) == ("", "ST")


def test_multi_token_stop_string_with_overlapping_prefixes():
    c = checker(["</a>"])
    results = feed(c, ["x", "<", "/a>", "y"][:3])
    assert [r.text for r in results] == ["x", "", ""]
    assert results[-1].stop_type is StopType.WORD


def test_eos_token_stops_with_type_eos_and_renders_no_text():
    c = checker([])
    assert c.add(TOKEN["a"]).text == "a"
    r = c.add(EOS_ID)
    assert (r.text, r.stop_type) == ("", StopType.EOS)


def test_eos_releases_held_back_text():
    c = checker(["STOP"])
    assert c.add(TOKEN["ST"]).text == ""
    r = c.add(EOS_ID)
    assert (r.text, r.stop_type) == ("ST", StopType.EOS)


def test_ignore_eos_does_not_stop():
    c = checker([], ignore_eos=True)
    assert c.add(EOS_ID).stop_type is StopType.NONE


def test_utf8_split_over_tokens_is_emitted_whole():
    c = checker([])
    assert c.add(32).text == ""  # b"\xe2\x82": an incomplete UTF-8 sequence
    assert c.add(33).text == "\u20ac"  # + b"\xac" = "€"


def test_stop_string_with_multibyte_character():
    c = checker(["\u20ac"])
    assert c.add(TOKEN["a"]).text == "a"
    assert c.add(32).text == ""
    r = c.add(33)
    assert (r.text, r.stop_type, r.stopping_word) == ("", StopType.WORD, "\u20ac")
