"""`python -m ggserve.bench.fidelity`: how far top-10 logits land from llama.cpp's reference logits.

Owns: the measurement behind the engine's logit tolerance. For every prompt of
testdata/golden/*.logits.json (both real models) it feeds `prompt_tokens` and reports the max and
mean |difference| at the reference's top-10 ids, over all positions, for
- ggserve's engine as it ships;
- ggserve with every matmul output nudged by at most one unit in the last place (seeded): how far
  last-bit noise alone, the kind any other summation order makes, moves the logits;
- llama.cpp itself, when llama-cpp-python is installed (`pip install -e ".[fidelity]"`: 0.3.36,
  the version that made the reference; it builds from source in ~8 minutes): once with the
  settings that made the reference (flash attention off, the prompt in one batch), which should
  reproduce it, and then with flash attention on (llama-server's default, `-fa auto`) and with
  one token per batch (`-ub 1`).

The last two rows are llama.cpp disagreeing with its own reference: the floor for any engine
that does not reproduce that build's arithmetic bit for bit. ggserve does reproduce it for the
Gemma 3 prompts (kernels/lanes.py), so its first row there is 0.000 to the reference's digits.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import ggserve.engine.model.model as model_module
from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.model.model import load_model
from ggserve.server.model_store import GEMMA3_270M, QWEN_CODER_05B, ensure_model
from tests.testdata import reference_data_dir

MODELS = {"qwen": QWEN_CODER_05B, "gemma": GEMMA3_270M}
N_CTX = 256
LLAMA_CPP_SETTINGS = {
    "llama.cpp as the reference was made": {},
    "llama.cpp, flash attention on": {"flash_attn": True},
    "llama.cpp, one token per batch": {"n_batch": 1, "n_ubatch": 1},
}


def top10_diffs(logits_per_case, cases, against=None) -> tuple[float, float]:
    """(max, mean) |logit - reference| at the reference's top-10 ids, over every position; with
    `against` (logits per case) the difference from those logits instead of the reference's."""
    diffs = []
    for i, (logits, case) in enumerate(zip(logits_per_case, cases)):
        for pos, (row, ref) in enumerate(zip(logits, case["top10_per_position"])):
            other = np.array(ref["logits"]) if against is None else against[i][pos][ref["ids"]]
            diffs.append(np.abs(row[ref["ids"]] - other))
    diffs = np.concatenate(diffs)
    return float(diffs.max()), float(diffs.mean())


def ggserve_logits(path, cases, perturb_seed: int | None = None) -> list[np.ndarray]:
    model = load_model(GGUFFile(path), n_slots=1, n_ctx=N_CTX)
    matmul = model_module.matmul
    if perturb_seed is not None:
        rng = np.random.default_rng(perturb_seed)

        def nudged(x, w, out, *args):  # out *= 1 + {-1, 0, 1} * 2^-24: at most one ulp
            matmul(x, w, out, *args)
            out *= (1 + rng.integers(-1, 2, out.shape) * 2.0**-24).astype(np.float32)

        model_module.matmul = nudged
    try:
        out = []
        for case in cases:
            tokens = np.array(case["prompt_tokens"])
            n = len(tokens)
            model.kv_cache.clear(0)
            out.append(model.forward(tokens, np.arange(n), np.zeros(n, int), np.arange(n)))
        return out
    finally:
        model_module.matmul = matmul


def llama_cpp_logits(path, cases, settings: dict) -> list[np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=N_CTX, verbose=False, **settings)
    out = []
    for case in cases:
        llm.reset()
        llm.eval(case["prompt_tokens"])
        out.append(np.array(llm.scores[:len(case["prompt_tokens"])]))
    return out


def report(label: str, diffs: tuple[float, float], note: str = "") -> None:
    print(f"  {label:45s} max {diffs[0]:.3f}  mean {diffs[1]:.3f}  {note}".rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggserve.bench.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen,gemma", help="comma-separated: qwen, gemma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one-ulp nudges")
    args = parser.parse_args(argv)
    golden = reference_data_dir() / "golden"
    if not golden.is_dir():
        print(f"reference data not found at {golden} (set GGSERVE_TESTDATA)", file=sys.stderr)
        return 2
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    for which in args.models.split(","):
        bundled = MODELS[which]
        path = ensure_model(bundled)
        cases = json.loads((golden / bundled.file_name.replace(".gguf", ".logits.json")).read_text())["cases"]
        print(f"{bundled.file_name}: top-10 logit |diff| from llama.cpp's reference, {len(cases)} prompts")
        ours = ggserve_logits(path, cases)
        report("ggserve", top10_diffs(ours, cases))
        nudged = ggserve_logits(path, cases, args.seed)
        report("ggserve, matmul outputs nudged by <= 1 ulp", top10_diffs(nudged, cases),
               f"(from unnudged ggserve: max {top10_diffs(nudged, cases, ours)[0]:.3f})")
        if have_llama_cpp:
            for label, settings in LLAMA_CPP_SETTINGS.items():
                report(label, top10_diffs(llama_cpp_logits(path, cases, settings), cases))
        else:
            print('  (llama.cpp rows skipped: pip install -e ".[fidelity]")')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
