"""`ggserve tokenize`: llama.cpp's `llama-tokenize` for any GGUF, vocab-only files included.

Owns: the tokenize command line -- prompt from `-p`, `-f` or `--stdin`, llama-tokenize's escape
processing (`\\n`, `\\t`, `\\xHH`... unless `--no-escape`), its output formats (default
`%6d -> 'piece'` lines, `--ids` as `[1, 2, 3]`, `--show-count`) and its flags (`--no-bos`,
`--no-parse-special`), plus `--jsonl` for bulk checks: one JSON string (or
`{"text", "add_special", "parse_special"}` object) per stdin line in, one JSON array of ids per
line out, with the tokenizer built once.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, BinaryIO

from ggserve import engine  # names resolve lazily: a header-only command never imports numba

_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"',
            ord("\\"): b"\\"}
_HEX = frozenset(b"0123456789abcdefABCDEF")



def process_escapes(raw: bytes) -> bytes:
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ and \\xHH; any other
    backslash pair is kept as written."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x5C or i + 1 >= n:  # not a backslash, or a trailing one
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt]
            i += 2
        elif nxt == ord("x") and i + 3 < n and raw[i + 2] in _HEX and raw[i + 3] in _HEX:
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        else:
            out += raw[i:i + 2]
            i += 2
    return bytes(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ggserve tokenize",
                                description="Tokenize a prompt with a GGUF model's vocabulary.")
    p.add_argument("-m", "--model", required=True, help="path to the GGUF file (vocab-only is fine)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="prompt text")
    source.add_argument("-f", "--file", help="read the prompt from this file")
    source.add_argument("--stdin", action="store_true", help="read the prompt from standard input")
    source.add_argument("--jsonl", action="store_true",
                        help="bulk mode: one JSON string (or {text, add_special, parse_special}) "
                             "per stdin line -> one JSON array of ids per stdout line")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--ids", action="store_true", help="print only the ids, as [1, 2, 3]")
    out.add_argument("--show-pieces", action="store_true",
                     help="print `id -> 'piece'` lines (the default)")
    p.add_argument("--show-count", action="store_true", help="print the total number of tokens")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS (add_special off)")
    p.add_argument("--no-escape", action="store_true", help="do not process \\n, \\t... escapes")
    p.add_argument("--no-parse-special", action="store_true",
                   help="treat special-token text as plain text")
    p.add_argument("--log-disable", action="store_true", help="accepted for llama-tokenize "
                   "compatibility (ggserve logs nothing here)")
    return p


def _stdout() -> BinaryIO:
    sys.stdout.flush()
    return getattr(sys.stdout, "buffer", None) or _TextAsBinary(sys.stdout)


class _TextAsBinary:
    """Fallback when stdout has no byte layer (an embedding application replaced it)."""

    def __init__(self, text_stream):
        self._text = text_stream

    def write(self, data: bytes) -> None:
        self._text.write(data.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        self._text.flush()


def _run_jsonl(tok: Any, add_special: bool, parse_special: bool) -> int:
    out = _stdout()
    # Bytes, decoded as UTF-8 whatever the locale says (JSON text is UTF-8).
    lines = getattr(sys.stdin, "buffer", sys.stdin)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)  # accepts str or UTF-8 bytes
            if isinstance(item, dict):
                text = item["text"]
                ids = tok.encode(text, add_special=bool(item.get("add_special", add_special)),
                                 parse_special=bool(item.get("parse_special", parse_special)))
            elif isinstance(item, str):
                ids = tok.encode(item, add_special=add_special, parse_special=parse_special)
            else:
                raise ValueError("expected a JSON string or an object with 'text'")
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: stdin line {line_no}: {e}", file=sys.stderr)
            return 1
        out.write((json.dumps([int(i) for i in ids]) + "\n").encode())
        out.flush()  # a caller may be waiting for this line before sending the next
    return 0


def _read_prompt(args: argparse.Namespace) -> bytes:
    if args.file is not None:
        with open(args.file, "rb") as f:
            return f.read()
    if args.stdin:
        return sys.stdin.buffer.read()
    return args.prompt.encode("utf-8", errors="surrogateescape")


def _run(args: argparse.Namespace) -> int:
    GGUFFile, GGUFError = engine.GGUFFile, engine.GGUFError
    Tokenizer = engine.Tokenizer
    try:
        tok = Tokenizer.from_gguf(GGUFFile(args.model))
    except (GGUFError, ValueError) as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 1
    # llama-tokenize: add_special = the vocab's add_bos and not --no-bos.
    add_special = bool(tok.add_bos) and not args.no_bos
    parse_special = not args.no_parse_special
    if args.jsonl:
        return _run_jsonl(tok, add_special, parse_special)
    try:
        raw = _read_prompt(args)
        if not args.no_escape:
            raw = process_escapes(raw)
        prompt = raw.decode("utf-8")
    except OSError as e:
        print(f"error: cannot read prompt: {e}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as e:
        print(f"error: prompt is not valid UTF-8: {e}", file=sys.stderr)
        return 1
    ids = tok.encode(prompt, add_special=add_special, parse_special=parse_special)
    out = _stdout()
    if args.ids:
        out.write(("[" + ", ".join(str(int(i)) for i in ids) + "]\n").encode())
    else:
        for i in ids:  # raw piece bytes, like llama-tokenize on a POSIX terminal
            out.write(f"{int(i):6d} -> '".encode() + tok.token_to_piece(int(i), special=True) + b"'\n")
    if args.show_count:
        out.write(f"Total number of tokens: {len(ids)}\n".encode())
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h, or a usage error (argparse already printed it)
        return int(e.code or 0)
    if args.prompt is None and args.file is None and not args.stdin and not args.jsonl:
        parser.print_usage(sys.stderr)
        print("error: a prompt source is required (-p, -f, --stdin or --jsonl)", file=sys.stderr)
        return 2
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
