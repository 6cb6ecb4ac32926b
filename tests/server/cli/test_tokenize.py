"""`ggserve tokenize`: llama-tokenize's output formats and flags, checked against llama.cpp's
own tokenizer test vectors (testdata/vocab) and golden token ids of the real models."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ggserve.server.__main__ import main
from tests.testdata import REPO_ROOT

SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_cases(vocab_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings and the ids it produces (add_special=False, parse_special=False)."""
    inp = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    assert inp.endswith(SEPARATOR)
    texts = inp[:-len(SEPARATOR)].split(SEPARATOR)
    outs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(outs) == len(texts)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


@pytest.fixture(scope="module")
def vocab_dir(testdata_dir: Path) -> Path:
    return testdata_dir / "vocab"


@pytest.fixture
def spm(vocab_dir) -> str:
    return str(vocab_dir / "ggml-vocab-llama-spm.gguf")


@pytest.fixture
def qwen2(vocab_dir) -> str:
    return str(vocab_dir / "ggml-vocab-qwen2.gguf")


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["tokenize", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_default_output_is_llama_tokenize_pieces(capsys, spm):
    rc, out, _ = run(capsys, "-m", spm, "-p", "Hello world")
    assert rc == 0
    # llama-spm adds BOS by default; ids from llama.cpp's vocab test ("Hello world" -> 15043 3186).
    assert out == "     1 -> '<s>'\n 15043 -> ' Hello'\n  3186 -> ' world'\n"
    rc, out2, _ = run(capsys, "-m", spm, "-p", "Hello world", "--show-pieces")
    assert out2 == out


def test_ids_no_bos_and_count(capsys, spm):
    assert run(capsys, "-m", spm, "-p", "Hello world", "--ids")[1] == "[1, 15043, 3186]\n"
    rc, out, _ = run(capsys, "-m", spm, "-p", "Hello world", "--ids", "--no-bos", "--show-count")
    assert out == "[15043, 3186]\nTotal number of tokens: 2\n"


def test_parse_special_switch(capsys, qwen2):
    out = run(capsys, "-m", qwen2, "-p", "<|im_start|>user", "--ids")[1]
    ids = json.loads(out)
    assert ids[0] == 151644 and len(ids) == 2  # <|im_start|> is one control token
    plain = json.loads(run(capsys, "-m", qwen2, "-p", "<|im_start|>user", "--ids",
                           "--no-parse-special")[1])
    assert 151644 not in plain and len(plain) > 3


def test_escapes_processed_unless_disabled(capsys, qwen2):
    escaped = run(capsys, "-m", qwen2, "-p", r"a\nb\x41", "--ids")[1]
    set_literal = run(capsys, "-m", qwen2, "-p", "a\nbA", "--ids")[1]
    assert escaped == set_literal
    raw = json.loads(run(capsys, "-m", qwen2, "-p", r"a\nb", "--ids", "--no-escape")[1])
    assert raw != json.loads(set_literal)
    assert run(capsys, "-m", qwen2, "-p", "a\\", "--ids")[0] == 0  # trailing backslash kept


def test_prompt_from_file_and_stdin(capsys, monkeypatch, tmp_path, qwen2):
    text = "def f(x):\n    return x * 2\n"
    path = tmp_path / "p.txt"
    path.write_text(text, encoding="utf-8")
    from_arg = run(capsys, "-m", qwen2, "-p", text, "--ids")[1]
    assert run(capsys, "-m", qwen2, "-f", str(path), "--ids")[1] == from_arg
    set_stdin(monkeypatch, text.encode())
    assert run(capsys, "-m", qwen2, "--stdin", "--ids")[1] == from_arg


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_jsonl_matches_llama_cpp_vectors(capsys, monkeypatch, vocab_dir, name):
    cases = vocab_cases(vocab_dir, name)
    assert len(cases) > 30
    set_stdin(monkeypatch, "".join(json.dumps(t) + "\n" for t, _ in cases).encode())
    rc, out, err = run(capsys, "-m", str(vocab_dir / f"ggml-vocab-{name}.gguf"), "--jsonl",
                       "--no-bos", "--no-parse-special")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == len(cases)
    for (text, expected), line in zip(cases, lines):
        assert json.loads(line) == expected, text


def test_jsonl_object_lines_override_flags(capsys, monkeypatch, spm):
    lines = [json.dumps("Hello world"), "", json.dumps({"text": "Hello world", "add_special": False}),
             json.dumps({"text": "<s>", "parse_special": True, "add_special": False})]
    set_stdin(monkeypatch, ("\n".join(lines) + "\n").encode())
    rc, out, _ = run(capsys, "-m", spm, "--jsonl")
    assert rc == 0
    assert [json.loads(x) for x in out.splitlines()] == [[1, 15043, 3186], [15043, 3186], [1]]


def test_jsonl_bad_line_is_an_error(capsys, monkeypatch, spm):
    set_stdin(monkeypatch, b'"ok"\n[1, 2]\n')
    rc, out, err = run(capsys, "-m", spm, "--jsonl")
    assert rc == 1 and len(out.splitlines()) == 1  # the good line was answered first
    assert "stdin line 2" in err


def test_errors(capsys, tmp_path, spm):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(40))
    rc, out, err = run(capsys, "-m", str(bad), "-p", "x")
    assert rc == 1 and out == "" and err.startswith("error: ") and "bad magic" in err
    rc, _, err = run(capsys, "-m", spm)
    assert rc == 2 and "prompt source is required" in err
    rc, _, err = run(capsys, "-m", spm, "-p", "x", "--stdin")
    assert rc == 2 and "not allowed with" in err
    rc, _, err = run(capsys, "-m", spm, "-f", str(tmp_path / "missing.txt"))
    assert rc == 1 and "cannot read prompt" in err


def test_subprocess_jsonl(vocab_dir):
    cases = vocab_cases(vocab_dir, "qwen2")[:10]
    proc = subprocess.run(
        [sys.executable, "-m", "ggserve.server", "tokenize", "-m", str(vocab_dir / "ggml-vocab-qwen2.gguf"),
         "--jsonl", "--no-parse-special"],
        input="".join(json.dumps(t) + "\n" for t, _ in cases), capture_output=True, text=True,
        cwd=REPO_ROOT, timeout=120, check=True)
    assert [json.loads(x) for x in proc.stdout.splitlines()] == [ids for _, ids in cases]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_real_models_match_golden(capsys, monkeypatch, testdata_dir, qwen_path, gemma_path, which):
    path, stem = ((qwen_path, "qwen2.5-coder-0.5b-instruct-q4_k_m") if which == "qwen"
                  else (gemma_path, "gemma-3-270m-q4_k_m"))
    cases = json.loads((testdata_dir / "golden" / f"{stem}.tokenize.json").read_text())["cases"]
    lines = [json.dumps({k: c[k] for k in ("text", "add_special", "parse_special")}) for c in cases]
    set_stdin(monkeypatch, ("\n".join(lines) + "\n").encode())
    rc, out, err = run(capsys, "-m", str(path), "--jsonl")
    assert rc == 0, err
    got = [json.loads(x) for x in out.splitlines()]
    assert got == [c["tokens"] for c in cases]
