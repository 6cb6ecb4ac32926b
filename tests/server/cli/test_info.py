"""`ggserve info`: the summary a user reads off a GGUF file, and how fast it comes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggserve.server.__main__ import main
from tests.testdata import REPO_ROOT



@pytest.fixture
def tiny_model(tmp_path) -> Path:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Tiny Test")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(7)  # MOSTLY_Q8_0
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((5, 64), dtype=np.float32))
    q8 = np.zeros((3, 2 * 34), dtype=np.uint8)  # 3 rows of 64 elements = 2 Q8_0 blocks each
    w.add_tensor("blk.0.attn_q.weight", q8,
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.1.attn_q.weight", q8,
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_info_text(tiny_model, capsys):
    assert main(["info", "-m", str(tiny_model)]) == 0
    f = _fields(capsys.readouterr().out)
    assert f["architecture"] == "llama" and f["name"] == "Tiny Test"
    assert f["context length"] == "4096" and f["vocab size"] == "5"
    assert f["file type"] == "Q8_0 (7)" and f["tensors"] == "4"
    assert f["tensor types"] == "F32: 2, Q8_0: 2"
    n_params = 5 * 64 + 2 * 3 * 64 + 64
    assert n_params == 768 and f["parameters"] == "768"
    assert f["attention heads"] == "4 (kv: 2)" and f["chat template"] == "yes (14 chars)"
    tensor_bytes = 5 * 64 * 4 + 2 * 3 * 68 + 64 * 4
    bpw = tensor_bytes * 8 / n_params
    assert f["size"].startswith(f"{tensor_bytes / 2**20:.2f} MiB of tensor data, {bpw:.2f} BPW")


def test_info_json(tiny_model, capsys):
    assert main(["info", "-m", str(tiny_model), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tensor_types"] == {"F32": 2, "Q8_0": 2}
    assert (s["vocab_size"], s["tensor_count"], s["gguf_version"]) == (5, 4, 3)
    assert s["file_bytes"] == tiny_model.stat().st_size


def test_info_rejects_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**63).to_bytes(8, "little") * 2)
    assert main(["info", "-m", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "impossible" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("which,expected", [
    ("qwen", {"architecture": "qwen2", "context length": "32768", "vocab size": "151936",
              "tensors": "291", "file type": "Q4_K - Medium (15)",
              "tensor types": "Q5_0: 133, F32: 121, Q8_0: 13, Q6_K: 12, Q4_K: 12",
              "parameters": "630.17 M (630167424)"}),
    ("gemma", {"architecture": "gemma3", "context length": "32768", "vocab size": "262144",
               "tensors": "236", "file type": "Q4_K - Medium (15)",
               "tensor types": "F32: 109, Q5_0: 81, Q4_K: 27, Q8_0: 10, Q6_K: 9",
               "parameters": "268.10 M (268098176)"}),
])
def test_info_real_models_fast(which, expected, qwen_path, gemma_path, capsys):
    path = qwen_path if which == "qwen" else gemma_path
    t0 = time.perf_counter()
    assert main(["info", "-m", str(path)]) == 0
    elapsed = time.perf_counter() - t0
    f = _fields(capsys.readouterr().out)
    for key, value in expected.items():
        assert f[key] == value, key
    assert elapsed < 2.0, elapsed


@pytest.mark.slow
def test_info_subprocess(qwen_path):
    out = subprocess.run([sys.executable, "-m", "ggserve.server", "info", "-m", str(qwen_path), "--json"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["architecture"] == "qwen2"
