"""Tokenizer rules on tiny hand-made vocabularies, with hand-computed expected ids: llama.cpp's
SPM merge order, byte fallback, BPE merge ranks, special tokens, BOS/EOS, EOG/FIM detection by
text, decode, metadata validation, and loading through a real GGUF file."""
from __future__ import annotations

import numpy as np
import pytest

from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.tokenizer import Tokenizer
from ggserve.engine.tokenizer.bpe import BYTE_TO_UNICODE

N_SPM_FIXED = 3 + 256  # <unk>, <s>, </s>, then <0x00>..<0xFF>


def spm_metadata(pieces: dict[str, float], extra: dict[str, int] | None = None, **keys) -> dict:
    """SPM vocab: ids 0-2 <unk> <s> </s>, 3+b byte tokens, then `pieces` (normal) and `extra`
    (text -> GGUF token type) in order."""
    extra = extra or {}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces) + list(extra)
    scores = [0.0] * N_SPM_FIXED + list(pieces.values()) + [0.0] * len(extra)
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + list(extra.values())
    md = {"general.architecture": "llama", "general.name": keys.pop("name", "tiny"),
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": np.array(scores, np.float32),
          "tokenizer.ggml.token_type": np.array(types, np.int32)}
    md.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return md


def bpe_metadata(tokens: list[str], merges: list[str], pre: str = "gpt-2", types: dict[str, int] | None = None,
                 **keys) -> dict:
    """Byte-level vocab: ids 0-255 are the 256 GPT-2 byte characters (in byte order), then `tokens`."""
    all_tokens = list(BYTE_TO_UNICODE) + tokens
    types = types or {}
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": all_tokens,
          "tokenizer.ggml.token_type": np.array([types.get(t, 1) for t in all_tokens], np.int32),
          "tokenizer.ggml.merges": merges}
    md.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return md


def ids_of(tok: Tokenizer, *texts: str) -> list[int]:
    return [tok.find_token(t) for t in texts]


# ----------------------------------------------------------------------------------------- SPM
@pytest.mark.parametrize("bc_score, expected", [
    # "▁abc": pairs ▁a(-3) ab(-2) bc(-0.5): bc merges first, then ▁a; "▁ab" (-0.1) is never reached
    (-0.5, ["▁a", "bc"]),
    # with bc below ab: ab merges first, which makes ▁ab (-0.1) possible, leaving c alone
    (-2.5, ["▁ab", "c"]),
])
def test_spm_merges_highest_score_first(bc_score, expected):
    pieces = {"▁": -1, "a": -1, "b": -1, "c": -1, "▁a": -3, "ab": -2, "bc": bc_score, "▁ab": -0.1}
    tok = Tokenizer.from_metadata(spm_metadata(pieces))
    assert tok.encode("abc", add_special=False) == ids_of(tok, *expected)


def test_spm_equal_scores_merge_leftmost_first():
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1, "a": -1, "aa": -1}))
    assert tok.encode("aaa", add_special=False) == ids_of(tok, "▁", "aa", "a")


def test_spm_unknown_characters_fall_back_to_utf8_bytes():
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1}))
    assert tok.encode("é", add_special=False) == [tok.find_token("▁"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("é", add_special=False)) == "é"


def test_spm_bos_eos_and_space_prefix_flags():
    pieces = {"▁": -1, "a": -1, "▁a": -1}
    tok = Tokenizer.from_metadata(spm_metadata(pieces))
    assert tok.add_bos and not tok.add_eos  # llama.cpp's SPM defaults
    assert tok.encode("a") == [1] + ids_of(tok, "▁a")
    tok = Tokenizer.from_metadata(spm_metadata(pieces, add_eos_token=True, add_bos_token=False))
    assert tok.encode("a") == ids_of(tok, "▁a") + [2]
    tok = Tokenizer.from_metadata(spm_metadata(pieces, add_space_prefix=False))  # Gemma 3 style
    assert tok.encode("a a", add_special=False) == ids_of(tok, "a", "▁a")
    assert tok.decode(ids_of(tok, "▁a")) == " a"  # nothing was prefixed, so nothing is removed


def test_spm_special_tokens_split_text_and_restart_the_space_prefix():
    pieces = {"▁": -1, "a": -1, "▁a": -1}
    tok = Tokenizer.from_metadata(spm_metadata(pieces, extra={"<ctl>": 3, "<ud>": 4}))
    ctl, ud, a = tok.find_token("<ctl>"), tok.find_token("<ud>"), tok.find_token("▁a")
    # the text after a special token gets its own prefix space, like the start of the text
    assert tok.encode("a<ctl>a", add_special=False, parse_special=True) == [a, ctl, a]
    # control tokens are plain text unless parse_special; user-defined ones always split
    plain = tok.encode("a<ctl>a", add_special=False, parse_special=False)
    assert ctl not in plain and plain[0] == a
    assert tok.encode("a<ud>a", add_special=False, parse_special=False) == [a, ud, a]
    # decode renders control tokens only when asked to, user-defined ones always
    assert tok.decode([a, ctl, ud, a], special=True) == "a<ctl><ud> a"
    assert tok.decode([a, ctl, ud, a], special=False) == "a<ud> a"


def test_longer_special_token_wins_over_its_prefix():
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1, "x": -1}, extra={"<|a|>": 3, "<|a|><|b|>": 3}))
    long_id = tok.find_token("<|a|><|b|>")
    assert tok.encode("<|a|><|b|>", add_special=False, parse_special=True) == [long_id]


# ----------------------------------------------------------------------------------------- BPE
def test_bpe_merges_by_rank_not_by_token_length():
    # " ab" = Ġ a b: "a b" (rank 0) merges before "Ġ a" (rank 2), and "Ġ ab" is no merge,
    # so the existing token "Ġab" is never reached
    tok = Tokenizer.from_metadata(bpe_metadata(["ab", "abc", "Ġa", "Ġab"], ["a b", "ab c", "Ġ a", "Ġa b"]))
    assert tok.encode("abc ab", add_special=False) == ids_of(tok, "abc", "Ġ", "ab")
    assert tok.decode(tok.encode("abc ab")) == "abc ab"


def test_llama3_emits_whole_words_that_are_tokens():
    md = bpe_metadata(["ab", "abc", "Ġa", "Ġab"], ["a b", "ab c", "Ġ a", "Ġa b"], pre="llama-bpe",
                      bos_token_id=5)
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos  # llama3 pre-tokenizer turns BOS on unless the file says otherwise
    assert tok.encode("abc ab") == [5] + ids_of(tok, "abc", "Ġab")


def test_bpe_pre_tokenizer_splits_before_merging():
    # gpt-2 splits "ab1" into "ab" + "1"; the merge "b 1" would otherwise apply
    tok = Tokenizer.from_metadata(bpe_metadata(["ab", "b1"], ["b 1", "a b"]))
    assert tok.encode("ab1", add_special=False) == ids_of(tok, "ab", "1")


def test_bpe_has_no_bos_by_default_and_clean_up_follows_the_pre_tokenizer():
    tok = Tokenizer.from_metadata(bpe_metadata([], []))
    assert not tok.add_bos and tok.encode("a b") == ids_of(tok, "a", "Ġ", "b")
    assert tok.decode(tok.encode("a , b")) == "a, b"  # gpt-2 keeps llama.cpp's clean-up on
    qwen = Tokenizer.from_metadata(bpe_metadata([], [], pre="qwen2"))
    assert qwen.decode(qwen.encode("a , b")) == "a , b"


# ------------------------------------------------------------------------- special ids and EOG
def test_end_of_generation_and_fim_tokens_are_found_by_text():
    extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_suffix|>",
             "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>"]
    types = {t: 3 for t in extra} | {"<|im_end|>": 1}  # a mislabelled (normal) <|im_end|>
    tok = Tokenizer.from_metadata(bpe_metadata(extra, [], pre="qwen2", types=types, eos_token_id=256))
    im_end = tok.find_token("<|im_end|>")
    assert tok.eos_id == 256 and tok.eot_id == im_end
    assert tok.eog_ids == frozenset(ids_of(tok, "<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|file_sep|>"))
    assert tok.is_eog(im_end) and not tok.is_eog(tok.find_token("<|im_start|>"))
    assert (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id) == tuple(
        ids_of(tok, "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert tok.fim_pad_id == tok.find_token("<|fim_pad|>") and tok.fim_repo_id is None
    # being an EOG text made <|im_end|> a control token: split by parse_special, hidden by special=False
    assert tok.encode("a<|im_end|>", add_special=False, parse_special=True) == [tok.find_token("a"), im_end]
    assert tok.decode([im_end], special=False) == "" and tok.decode([im_end]) == "<|im_end|>"


def test_metadata_ids_win_over_text_detection():
    extra = ["<|im_end|>", "<|eot|>"]
    tok = Tokenizer.from_metadata(bpe_metadata(extra, [], types={t: 3 for t in extra}, eot_token_id=257))
    assert tok.eot_id == 257
    assert tok.eog_ids >= {256, 257}


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "t5"}, "unsupported tokenizer model"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported BPE pre-tokenizer"),
    ({"tokenizer.ggml.tokens": []}, "tokens is missing"),
    ({"tokenizer.ggml.merges": None}, "merges"),
    ({"tokenizer.ggml.add_bos_token": True}, "no BOS token"),  # default BOS id 11 >= n_vocab
    ({"tokenizer.ggml.token_type": np.array([1], np.int32)}, "token_type has 1 entries"),
])
def test_bad_metadata_is_a_clear_value_error(change, message):
    md = bpe_metadata([], [])
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:8]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"][:8]
    md.update(change)
    if md["tokenizer.ggml.merges"] is None:
        del md["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_metadata(md)


def test_token_id_out_of_range_is_a_value_error():
    tok = Tokenizer.from_metadata(spm_metadata({"▁": -1}))
    with pytest.raises(ValueError, match="out of range"):
        tok.token_to_piece(tok.n_vocab)


# ------------------------------------------------------------------------------ via a GGUF file
def test_from_gguf_reads_a_written_vocab(tmp_path):
    gguf = pytest.importorskip("gguf")
    md = spm_metadata({"▁": -1, "h": -1, "i": -1, "▁h": -2, "▁hi": -1}, extra={"<end_of_turn>": 3},
                      add_space_prefix=True)
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_scores(md["tokenizer.ggml.scores"].tolist())
    writer.add_token_types(md["tokenizer.ggml.token_type"].tolist())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_gguf(GGUFFile(path))
    eot = tok.find_token("<end_of_turn>")
    assert tok.encode("hi") == [1, tok.find_token("▁hi")]
    assert tok.eog_ids == frozenset({2, eot}) and tok.eot_id == eot
    assert tok.decode(tok.encode("hi hi", add_special=False)) == "hi hi"


# ------------------------------------------------------------------------------ pre-tokenizers
@pytest.mark.parametrize("pre, text, words", [
    # llama3: case-insensitive contractions, digits in groups of three, newlines kept with spaces
    ("llama-bpe", "I'M 1234567 ok\n\n  x", ["I", "'M", " ", "123", "456", "7", " ok", "\n\n", " ", " x"]),
    # gpt-2: a run of spaces leaves its last space to the next word; case-sensitive contractions
    ("gpt-2", "a   b'S 12", ["a", "  ", " b", "'", "S", " 12"]),
    # qwen2: single digits; combining marks are not letters (Devanagari splits)...
    ("qwen2", "नमस्ते 42", ["नमस", "्त", "े", " ", "4", "2"]),
    # ...while qwen35 keeps marks with their letters
    ("qwen35", "नमस्ते 42", ["नमस्ते", " ", "4", "2"]),
    # non-ASCII whitespace is whitespace (U+3000 ideographic space, U+00A0)
    ("qwen2", "a\u3000\u00a0b", ["a", "\u3000", "\u00a0b"]),
])
def test_pre_tokenizer_splits(pre, text, words):
    from ggserve.engine.tokenizer.pretokenizer import PreTokenizer
    assert PreTokenizer(pre).split(text) == words
