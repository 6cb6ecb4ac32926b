"""`ggserve info -m FILE`: what a GGUF model is, read from its header alone.

Owns: summarising a GGUF file's metadata and tensor descriptors -- architecture, context length,
vocab size, tensor count, tensor types (count per type), llama.cpp's file type name, parameter
count, size and bits per weight -- as text or JSON (`--json`). Only the header is parsed (the
tensor data stays unread in the memory map), so it takes well under a second.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from ggserve import engine  # names resolve lazily: reading a header never imports numba

# llama.cpp's `llama_ftype` ids -> the names llama.cpp prints (llama_model_ftype_name).
FILE_TYPE_NAMES = {
    0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K - Medium", 11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large",
    14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K",
    19: "IQ2_XXS - 2.0625 bpw", 20: "IQ2_XS - 2.3125 bpw", 21: "Q2_K - Small",
    22: "IQ3_XS - 3.3 bpw", 23: "IQ3_XXS - 3.0625 bpw", 24: "IQ1_S - 1.5625 bpw",
    25: "IQ4_NL - 4.5 bpw", 26: "IQ3_S - 3.4375 bpw", 27: "IQ3_S mix - 3.66 bpw",
    28: "IQ2_S - 2.5 bpw", 29: "IQ2_M - 2.7 bpw", 30: "IQ4_XS - 4.25 bpw", 31: "IQ1_M - 1.75 bpw",
    32: "BF16", 36: "TQ1_0 - 1.69 bpw ternary", 37: "TQ2_0 - 2.06 bpw ternary", 38: "MXFP4 MoE",
}
_FILE_TYPE_GUESSED = 1024  # llama.cpp's LLAMA_FTYPE_GUESSED flag



def file_type_name(file_type: Any) -> str | None:
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        return None
    name = FILE_TYPE_NAMES.get(file_type & ~_FILE_TYPE_GUESSED, f"unknown ({file_type})")
    return name + (" (guessed)" if file_type & _FILE_TYPE_GUESSED else "")


def summarize(g: Any) -> dict[str, Any]:
    """Plain-data summary of a parsed GGUFFile."""
    meta = g.metadata
    arch = meta.get("general.architecture")
    arch_key = (lambda k: meta.get(f"{arch}.{k}")) if isinstance(arch, str) else (lambda k: None)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if isinstance(tokens, list) else arch_key("vocab_size")
    type_counts = Counter(t.ggml_type.name for t in g.tensors.values())
    n_params = sum(t.n_elements for t in g.tensors.values())
    tensor_bytes = sum(t.n_bytes for t in g.tensors.values())
    template = meta.get("tokenizer.chat_template")
    return {
        "path": str(g.path),
        "architecture": arch,
        "name": meta.get("general.name"),
        "gguf_version": g.version,
        "file_type": meta.get("general.file_type"),
        "file_type_name": file_type_name(meta.get("general.file_type")),
        "context_length": arch_key("context_length"),
        "embedding_length": arch_key("embedding_length"),
        "block_count": arch_key("block_count"),
        "head_count": arch_key("attention.head_count"),
        "head_count_kv": arch_key("attention.head_count_kv"),
        "vocab_size": vocab_size,
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "chat_template_chars": len(template) if isinstance(template, str) else None,
        "metadata_count": len(meta),
        "tensor_count": len(g.tensors),
        "tensor_types": dict(type_counts.most_common()),
        "n_params": n_params,
        "tensor_bytes": tensor_bytes,
        "file_bytes": g.size,
        "bits_per_weight": tensor_bytes * 8 / n_params if n_params else None,
    }


def _params_text(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} ({n})"
    return str(n)


def format_text(s: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return "n/a" if value is None else str(value)

    file_type = s["file_type_name"] and f"{s['file_type_name']} ({s['file_type']})"
    tokenizer = s["tokenizer_model"] and (s["tokenizer_model"] + (
        f" (pre: {s['tokenizer_pre']})" if s["tokenizer_pre"] else ""))
    template = (f"yes ({s['chat_template_chars']} chars)" if s["chat_template_chars"]
                else "no (chatml fallback)")
    bpw = f", {s['bits_per_weight']:.2f} BPW" if s["bits_per_weight"] else ""
    rows = [
        ("file", s["path"]), ("architecture", s["architecture"]), ("name", s["name"]),
        ("GGUF version", s["gguf_version"]), ("file type", file_type),
        ("context length", s["context_length"]), ("embedding length", s["embedding_length"]),
        ("block count", s["block_count"]),
        ("attention heads", s["head_count"] and f"{s['head_count']} (kv: {show(s['head_count_kv'])})"),
        ("vocab size", s["vocab_size"]), ("tokenizer", tokenizer), ("chat template", template),
        ("metadata keys", s["metadata_count"]), ("tensors", s["tensor_count"]),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in s["tensor_types"].items()) or None),
        ("parameters", _params_text(s["n_params"])),
        ("size", f"{s['tensor_bytes'] / 2**20:.2f} MiB of tensor data{bpw}; "
                 f"file {s['file_bytes']} bytes"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {show(v)}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ggserve info",
                                     description="Summarise a GGUF model file (header only).")
    parser.add_argument("-m", "--model", required=True, help="path to the GGUF file")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    GGUFFile, GGUFError = engine.GGUFFile, engine.GGUFError
    try:
        g = GGUFFile(args.model)
    except GGUFError as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 1
    summary = summarize(g)
    print(json.dumps(summary) if args.json else format_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
