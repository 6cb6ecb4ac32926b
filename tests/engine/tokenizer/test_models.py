"""Tokenizers of the two real models against llama.cpp's golden output (testdata/golden/*.tokenize.json,
all four add_special/parse_special combinations), plus the special-token facts llama.cpp derives."""
from __future__ import annotations

import json

import pytest

from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m"
GEMMA = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def qwen(qwen_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(qwen_path))


@pytest.fixture(scope="module")
def gemma(gemma_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(gemma_path))


def _golden(testdata_dir, name):
    return json.loads((testdata_dir / "golden" / f"{name}.tokenize.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_matches_llama_cpp_golden_tokenization(request, testdata_dir, model):
    tok = request.getfixturevalue(model)
    cases = _golden(testdata_dir, QWEN if model == "qwen" else GEMMA)
    assert len(cases) == 132
    failures = []
    for case in cases:
        got = tok.encode(case["text"], add_special=case["add_special"], parse_special=case["parse_special"])
        if got != case["tokens"]:
            failures.append((case["text"], case["add_special"], case["parse_special"], case["tokens"], got))
    assert not failures, f"{len(cases) - len(failures)}/{len(cases)} match; first: {failures[0]!r}"


def test_qwen_special_tokens(qwen):
    assert (qwen.bos_id, qwen.eos_id, qwen.eot_id) == (151643, 151645, 151645)
    assert not qwen.add_bos and not qwen.add_eos
    # llama.cpp's EOG list by text: </s> (a normal token in this vocab!), <|endoftext|>, <|im_end|>,
    # and FIM pad / repo / file-separator
    assert qwen.eog_ids == frozenset({128247, 151643, 151645, 151662, 151663, 151664})
    assert qwen.token_text(128247) == "</s>"
    assert (qwen.fim_prefix_id, qwen.fim_middle_id, qwen.fim_suffix_id) == (151659, 151660, 151661)
    assert (qwen.fim_pad_id, qwen.fim_repo_id, qwen.fim_sep_id) == (151662, 151663, 151664)
    assert qwen.nl_id == 198


def test_gemma_special_tokens(gemma):
    assert (gemma.bos_id, gemma.eos_id, gemma.eot_id) == (2, 1, 106)
    assert gemma.add_bos and not gemma.vocab.add_space_prefix
    assert gemma.eog_ids == frozenset({1, 106, 212})  # <eos>, <end_of_turn>, </s>
    assert gemma.fim_prefix_id is None
    assert gemma.token_text(gemma.nl_id) == "<0x0A>"  # llama.cpp's SPM newline is the byte token

def test_decode_of_real_models(qwen, gemma):
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)
    assert qwen.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert qwen.decode(ids, special=False) == "user\nhi"
    ids = gemma.encode("<start_of_turn>user\nHello world<end_of_turn>", parse_special=True)
    assert ids[:2] == [2, 105]
    assert gemma.decode(ids) == "<bos><start_of_turn>user\nHello world<end_of_turn>"
    assert gemma.decode(ids, special=False) == "user\nHello world"


def test_streaming_gemma_byte_fallback(gemma):
    ids = gemma.encode("\u3000全角", add_special=False)
    assert ids[:3] == [465, 366, 366]  # U+3000 has no token: <0xE3><0x80><0x80>
    det = IncrementalDetokenizer(gemma)
    out = [det.add(i) for i in ids]
    assert out[:3] == ["", "", "\u3000"]
    assert "".join(out) + det.flush() == "\u3000全角"
