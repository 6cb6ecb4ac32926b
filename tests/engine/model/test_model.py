"""engine/model on tiny synthetic GGUFs (written here with gguf.GGUFWriter) against a plain-numpy
forward pass written from llama.cpp's graph definitions, plus batching and validation behaviour."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from ggserve.engine.model.model import load_model
from tests.kernels.test_matmul import ggml_q8_0_activations, ggml_q8_k_activations

N_VOCAB, N_EMBD, N_HEADS, N_KV, HEAD_DIM, N_FF, N_LAYERS = 80, 64, 4, 2, 16, 256, 2


def _q6_k_random(rng, m, k):
    # gguf-py cannot quantize to Q6_K: random blocks with a sane f16 scale in the last 2 bytes
    blocks = rng.integers(0, 256, (m, k // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    blocks[..., 192:208] = rng.integers(-20, 20, (m, k // 256, 16)).astype(np.int8).view(np.uint8)
    return blocks.reshape(m, -1)


TYPES = "__types__"  # the reference dict's entry mapping tensor name -> GGML type


def write_model(path, arch="llama", seed=0, tied=False, sliding_window=0, extra=None):
    """Write a 2-layer model of `arch` with weights in assorted GGML types; returns {name: f32
    array} plus {TYPES: {name: type}}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(5000.0)
    if arch == "gemma3":
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_sliding_window(sliding_window)
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    ref = {}
    tensor_types = {}

    def add(name, shape, qtype=Q.F32, scale=0.2, offset=0.0):
        tensor_types[name] = qtype
        x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        if qtype == Q.F32:
            data, ref[name] = x, x
        elif qtype == Q.F16:
            data = x.astype(np.float16)
            ref[name] = data.astype(np.float32)
        else:
            data = _q6_k_random(rng, *shape) if qtype == Q.Q6_K else quantize(x, qtype)
            ref[name] = dequantize(data, qtype).reshape(shape).astype(np.float32)
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    def norm(name, n):
        add(name, (n,), Q.F32, 0.1, 1.0)  # near 1 so activations stay in a sane range

    add("token_embd.weight", (N_VOCAB, N_EMBD), Q.Q8_0, 1.0)
    norm("output_norm.weight", N_EMBD)
    if not tied:
        add("output.weight", (N_VOCAB, N_EMBD), Q.F16)
    types = [Q.Q8_0, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.F32, Q.Q6_K]
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", N_EMBD)
        add(p + "attn_q.weight", (N_HEADS * HEAD_DIM, N_EMBD), types[i % 2])
        add(p + "attn_k.weight", (N_KV * HEAD_DIM, N_EMBD), Q.BF16)
        add(p + "attn_v.weight", (N_KV * HEAD_DIM, N_EMBD), Q.Q5_1)
        add(p + "attn_output.weight", (N_EMBD, N_HEADS * HEAD_DIM), Q.Q4_0)
        norm(p + "ffn_norm.weight", N_EMBD)
        add(p + "ffn_gate.weight", (N_FF, N_EMBD), Q.Q5_0)
        add(p + "ffn_up.weight", (N_FF, N_EMBD), Q.Q4_1)
        add(p + "ffn_down.weight", (N_EMBD, N_FF), Q.Q6_K if i == 0 else Q.Q8_0)
        if arch == "qwen2":
            for name, n in (("attn_q.bias", N_HEADS * HEAD_DIM), ("attn_k.bias", N_KV * HEAD_DIM), ("attn_v.bias", N_KV * HEAD_DIM)):
                add(p + name, (n,), Q.F32, 0.5)
        if arch in ("qwen3", "gemma3"):
            norm(p + "attn_q_norm.weight", HEAD_DIM)
            norm(p + "attn_k_norm.weight", HEAD_DIM)
        if arch == "gemma3":
            norm(p + "post_attention_norm.weight", N_EMBD)
            norm(p + "post_ffw_norm.weight", N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref[TYPES] = tensor_types
    return ref


def _rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, base, neox):
    # x (n, heads, d) at positions 0..n-1
    n, _, d = x.shape
    inv = base ** (-np.arange(0, d, 2) / d)
    angle = np.arange(n)[:, None, None] * inv[None, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def reference_forward(ref, arch, tokens, swa_layers=(), window=0, embeddings=False, repack=True, kv_f16=False):
    """llama.cpp's graph for llama/qwen2/qwen3/gemma3, in float64 numpy, positions 0..n-1.
    Like llama.cpp (and the engine's kernels), a Q8_0 matrix multiplies its input rounded to Q8_0
    (with repacking a Q4_0 or Q5_0 matrix is one, kernels/repack.py) and a Q4_K / Q6_K matrix its input
    rounded to Q8_K."""
    types = ref[TYPES]
    t = {k: v.astype(np.float64) for k, v in ref.items() if k != TYPES}
    n = len(tokens)
    q8_types = {Q.Q8_0, Q.Q5_0, Q.Q4_0} if repack else {Q.Q8_0, Q.Q5_0}

    def mm(h, name):  # h @ W^T with the activations the engine's kernel for W really uses
        if types[name] in q8_types:
            h = ggml_q8_0_activations(h)
        elif types[name] in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            h = ggml_q8_k_activations(h)
        return h @ t[name].T

    gemma = arch == "gemma3"
    x = t["token_embd.weight"][tokens] * (math.sqrt(N_EMBD) if gemma else 1.0)
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        h = _rms(x, t[p + "attn_norm.weight"])
        q, k, v = (mm(h, p + f"attn_{c}.weight") + t.get(p + f"attn_{c}.bias", 0.0) for c in "qkv")
        q, k, v = q.reshape(n, N_HEADS, HEAD_DIM), k.reshape(n, N_KV, HEAD_DIM), v.reshape(n, N_KV, HEAD_DIM)
        if arch in ("qwen3", "gemma3"):
            q, k = _rms(q, t[p + "attn_q_norm.weight"]), _rms(k, t[p + "attn_k_norm.weight"])
        swa = bool(swa_layers) and swa_layers[i]
        base = 10000.0 if swa else 5000.0
        q, k = _rope(q, base, arch != "llama"), _rope(k, base, arch != "llama")
        # Gemma's graph scales Q itself; the others scale Q.K
        q_scale, kq_scale = (1 / math.sqrt(HEAD_DIM), 1.0) if gemma else (1.0, 1 / math.sqrt(HEAD_DIM))
        q = q * q_scale
        # an f16 cache stores K and V as float16, and (without flash attention) llama.cpp multiplies
        # it by f16 operands: Q, and the normalized softmax probabilities
        f16 = (lambda a: a.astype(np.float16).astype(np.float64)) if kv_f16 else (lambda a: a)
        k, v, q = f16(k), f16(v), f16(q)
        attn = np.zeros((n, N_HEADS, HEAD_DIM))
        for pos in range(n):
            lo = max(0, pos - window + 1) if swa else 0
            for hd in range(N_HEADS):
                kv = hd // (N_HEADS // N_KV)
                s = k[lo:pos + 1, kv] @ q[pos, hd] * kq_scale
                e = np.exp(s - s.max())
                attn[pos, hd] = f16(e / e.sum()) @ v[lo:pos + 1, kv]
        o = mm(attn.reshape(n, -1), p + "attn_output.weight")
        if gemma:
            o = _rms(o, t[p + "post_attention_norm.weight"])
        x = x + o
        h = _rms(x, t[p + "ffn_norm.weight"])
        g, u = mm(h, p + "ffn_gate.weight"), mm(h, p + "ffn_up.weight")
        if gemma:
            # ggml looks GELU up in an f16 table: f16 in, f16 out; identity / zero beyond +-10
            gh = g.astype(np.float16).astype(np.float64)
            gelu = (0.5 * gh * (1 + np.tanh(math.sqrt(2 / math.pi) * (gh + 0.044715 * gh**3)))).astype(np.float16)
            a = np.where(g <= -10, 0.0, np.where(g >= 10, g, gelu.astype(np.float64))) * u
        else:
            a = g / (1 + np.exp(-g)) * u
        d = mm(a, p + "ffn_down.weight")
        if gemma:
            d = _rms(d, t[p + "post_ffw_norm.weight"])
        x = x + d
    x = _rms(x, t["output_norm.weight"])
    if embeddings:
        return x
    return mm(x, "output.weight" if "output.weight" in t else "token_embd.weight")


def run_prompt(model, tokens, slot=0):
    n = len(tokens)
    return model.forward(np.array(tokens), np.arange(n), np.full(n, slot), np.arange(n))


PROMPT = [1, 17, 33, 5, 79, 42, 8, 8, 60, 0, 23]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("repack", [True, False])
def test_logits_match_numpy_reference(tmp_path, arch, kv_dtype, repack):
    # The reference rounds what the engine rounds (8-bit activations; with an f16 cache also K, V, Q
    # and the probabilities), but in float64: where an f32 value sits at an f16 rounding boundary the
    # two round apart by one f16 step (2^-11), which the next 8-bit rounding can amplify
    tol = 2e-3 if kv_dtype == "f32" else 2e-2
    ref = write_model(tmp_path / "m.gguf", arch)
    model = load_model(GGUFFile(tmp_path / "m.gguf"), n_slots=2, n_ctx=32, kv_dtype=kv_dtype, repack=repack)
    assert model.config.architecture == arch and model.n_vocab == N_VOCAB
    # the Q5_0 ffn_gate is streamed every step as Q5_0 (its integer kernel unpacks in registers)
    gate = model.weights.layers[0].w_gate
    assert gate.ggml_type == Q.Q5_0
    logits = run_prompt(model, PROMPT)
    expected = reference_forward(ref, arch, PROMPT, repack=repack, kv_f16=kv_dtype == "f16")
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero vectors
    np.testing.assert_allclose(logits, expected, atol=tol * np.abs(expected).max())
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_gemma3_sliding_window_post_norms_and_tied_output(tmp_path):
    pattern = {"gemma3.attention.sliding_window_pattern": ([True, False], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)}
    ref = write_model(tmp_path / "g.gguf", "gemma3", tied=True, sliding_window=3, extra=pattern)
    model = load_model(GGUFFile(tmp_path / "g.gguf"), n_slots=1, n_ctx=32, kv_dtype="f32")
    c = model.config
    assert c.swa_layers == (True, False) and c.sliding_window == 3 and model.weights.tied_output
    assert c.rope_spec(0).freq_base == 10000.0 and c.rope_spec(1).freq_base == 5000.0
    logits = run_prompt(model, PROMPT)
    expected = reference_forward(ref, "gemma3", PROMPT, swa_layers=(True, False), window=3)
    np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max())
    # the window matters: a full-attention reference differs past the window
    full = reference_forward(ref, "gemma3", PROMPT, swa_layers=(False, False))
    assert np.abs(full[5:] - expected[5:]).max() > 10 * 2e-3 * np.abs(expected).max()


def test_embeddings_output_is_final_norm_hidden_state(tmp_path):
    ref = write_model(tmp_path / "m.gguf", "llama")
    model = load_model(GGUFFile(tmp_path / "m.gguf"), n_slots=1, n_ctx=32, kv_dtype="f32")
    n = len(PROMPT)
    hidden = model.forward(np.array(PROMPT), np.arange(n), np.zeros(n), np.array([n - 1, 0]), output="embeddings")
    expected = reference_forward(ref, "llama", PROMPT, embeddings=True)[[n - 1, 0]]
    assert hidden.shape == (2, N_EMBD)
    np.testing.assert_allclose(hidden, expected, atol=2e-3 * np.abs(expected).max())


@pytest.fixture
def llama_model(tmp_path):
    write_model(tmp_path / "m.gguf", "llama", seed=5)
    return lambda n_slots=4, n_ctx=32: load_model(GGUFFile(tmp_path / "m.gguf"), n_slots=n_slots, n_ctx=n_ctx)


def test_chunked_prefill_and_decode_equal_one_shot(llama_model):
    one_shot = run_prompt(llama_model(), PROMPT)
    model = llama_model()
    pieces = [PROMPT[:4], PROMPT[4:9]] + [[t] for t in PROMPT[9:]]
    start, rows = 0, []
    for piece in pieces:
        n = len(piece)
        rows.append(model.forward(np.array(piece), np.arange(start, start + n), np.zeros(n), np.arange(n)))
        start += n
    np.testing.assert_allclose(np.concatenate(rows), one_shot, rtol=1e-4, atol=1e-4)
    assert model.kv_cache.cached_tokens(0) == PROMPT


def test_a_prompts_batch_span_gives_its_one_shot_bits_however_it_is_chunked(llama_model):
    # The engine passes each prompt row the span of the whole prompt (engine/runner.py): chunked
    # prefill, or a prompt-cache hit re-evaluating only the last token, then sums every row in
    # the shapes of the one-shot batch, so the logits are the same bits (seeded sampling stays
    # reproducible); without the spans, chunks are shaped by what each one holds.
    one_shot = run_prompt(llama_model(), PROMPT)
    span = np.array([0, len(PROMPT) - 1])
    for pieces in ([PROMPT[:3], PROMPT[3:10], PROMPT[10:]], [PROMPT[:-1], PROMPT[-1:]]):
        model = llama_model()
        start, rows = 0, []
        for piece in pieces:
            n = len(piece)
            rows.append(model.forward(np.array(piece), np.arange(start, start + n), np.zeros(n), np.arange(n),
                                      batch_spans=np.tile(span, (n, 1))))
            start += n
        np.testing.assert_array_equal(np.concatenate(rows), one_shot)
    with pytest.raises(ValueError, match="batch_spans"):
        llama_model().forward(np.array(PROMPT[:2]), np.arange(2), np.zeros(2), np.arange(2),
                              batch_spans=np.array([[1, 1], [1, 1]]))


def test_mixed_batch_of_slots_equals_separate_runs(llama_model):
    alone = llama_model()
    a, b = PROMPT, [3, 3, 70, 12]
    logits_a = run_prompt(alone, a, slot=0)
    logits_b = run_prompt(alone, b, slot=1)
    model = llama_model()
    # slot 0 already holds a[:6]; one batch carries a decode chunk of slot 0 and all of slot 2's prompt
    model.forward(np.array(a[:6]), np.arange(6), np.zeros(6), np.array([], np.int32))
    tokens = [a[6], b[0], b[1], a[7], b[2], b[3]]
    positions = [6, 0, 1, 7, 2, 3]
    slots = [0, 2, 2, 0, 2, 2]
    out = model.forward(np.array(tokens), np.array(positions), np.array(slots), np.array([3, 5, 0]))
    np.testing.assert_allclose(out[0], logits_a[7], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[1], logits_b[3], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[2], logits_a[6], rtol=1e-4, atol=1e-4)
    assert model.kv_cache.num_cached(0) == 8 and model.kv_cache.cached_tokens(2) == b


def test_long_prompt_gives_the_same_bits_alone_and_beside_short_ones(llama_model):
    # A 40-token prompt takes the BLAS prefill path and 3-5 token prompts the fused one. Batched
    # together (47 rows), each prompt must still take its own path: activations are rounded to
    # 8 bits before Q8_0 matmuls, which would amplify any path switch into visible differences.
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(0, N_VOCAB, 40).tolist()
    shorts = [[5, 9, 2], [7, 7, 7, 1], [60, 3, 3, 8, 0]]
    alone = llama_model(n_slots=4, n_ctx=64)
    expected = [run_prompt(alone, p, slot=s) for s, p in enumerate([long_prompt] + shorts)]
    model = llama_model(n_slots=4, n_ctx=64)
    prompts = [long_prompt] + shorts
    tokens = np.concatenate([np.array(p) for p in prompts])
    positions = np.concatenate([np.arange(len(p)) for p in prompts])
    slots = np.concatenate([np.full(len(p), s) for s, p in enumerate(prompts)])
    out = model.forward(tokens, positions, slots, np.arange(tokens.size))
    starts = np.cumsum([0] + [len(p) for p in prompts])
    for s, exp in enumerate(expected):
        np.testing.assert_array_equal(out[starts[s]:starts[s + 1]], exp, err_msg=f"slot {s}")


def test_batch_validation_errors(llama_model):
    model = llama_model(n_slots=2, n_ctx=8)
    ok = dict(token_ids=np.array([1, 2]), positions=np.array([0, 1]), slot_ids=np.array([0, 0]), logits_rows=np.array([1]))
    cases = [
        (dict(slot_ids=np.array([0, 2])), "slot id 2 out of range"),
        (dict(positions=np.array([0, 2])), "contiguous"),
        (dict(positions=np.array([1, 2])), "contiguous"),
        (dict(token_ids=np.array([1, N_VOCAB])), f"token id {N_VOCAB} out of range"),
        (dict(logits_rows=np.array([2])), "logits_rows"),
        (dict(positions=np.array([0])), "same length"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model.forward(**{**ok, **change})
    assert model.kv_cache.num_cached(0) == 0  # rejected batches leave no trace
    with pytest.raises(ValueError, match="output"):
        model.forward(**ok, output="hidden")
    model.forward(np.arange(8), np.arange(8), np.zeros(8), np.array([7]))
    with pytest.raises(ValueError, match="context exceeded"):
        model.forward(np.array([1]), np.array([8]), np.array([0]), np.array([0]))


def test_unknown_architecture_and_missing_tensor_are_clear_errors(tmp_path):
    write_model(tmp_path / "m.gguf", "mamba")
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'.*llama, qwen2, qwen3, gemma3"):
        load_model(GGUFFile(tmp_path / "m.gguf"), 1, 16)
    assert SUPPORTED_ARCHITECTURES == ("llama", "qwen2", "qwen3", "gemma3")
    write_model(tmp_path / "q.gguf", "qwen3")  # no Q/K/V biases; read as qwen2, which requires them
    g = GGUFFile(tmp_path / "q.gguf")
    g.metadata["general.architecture"] = "qwen2"
    g.metadata.update({k.replace("qwen3.", "qwen2."): v for k, v in list(g.metadata.items()) if k.startswith("qwen3.")})
    with pytest.raises(ValueError, match="missing tensor 'blk.0.attn_q.bias'"):
        load_model(g, 1, 16)


def test_linear_rope_scaling_and_unsupported_scaling(tmp_path):
    scaled = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
              "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}
    write_model(tmp_path / "s.gguf", "llama", extra=scaled)
    assert ModelConfig.from_gguf(GGUFFile(tmp_path / "s.gguf")).rope_freq_scale == 0.25
    yarn = {"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}
    write_model(tmp_path / "y.gguf", "llama", extra=yarn)
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_gguf(GGUFFile(tmp_path / "y.gguf"))
