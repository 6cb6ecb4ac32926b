"""Model hyperparameters read from GGUF metadata into one validated dataclass.

Owns: the table of supported architectures and what distinguishes them (rope layout, biases,
QK-norm, Gemma's extra norms and embedding scale, activation, sliding-window layers), and
`ModelConfig.from_gguf`, which reads `{arch}.*` keys with llama.cpp's defaults. The forward pass
reads only this config, so an architecture difference is a field here, never a code fork.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ggserve.engine.kv_cache import RopeSpec


@dataclass(frozen=True)
class ArchTraits:
    rope_neox: bool  # rope pairs (i, i + d/2) instead of (2i, 2i+1)
    qkv_bias: bool = False  # Q/K/V projections carry a bias (required tensors)
    qk_norm: bool = False  # per-head RMS norm of Q and K before rope
    post_norms: bool = False  # extra RMS norms on the attention and FFN outputs (Gemma 2/3)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(n_embd) (Gemma)
    activation: str = "silu"  # gated FFN activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh approx)
    swa_period: int = 0  # every swa_period-th layer is global, the others sliding-window (0: none)
    swa_freq_base: float = 10000.0  # rope base of sliding-window layers, unless the file says
    scale_query: bool = False  # the attention scale multiplies Q before Q.K (llama.cpp's Gemma graph)


ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(rope_neox=False),
    "qwen2": ArchTraits(rope_neox=True, qkv_bias=True),
    "qwen3": ArchTraits(rope_neox=True, qk_norm=True),
    "gemma3": ArchTraits(rope_neox=True, qk_norm=True, post_norms=True, embed_scale=True,
                         activation="gelu", swa_period=6, scale_query=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_vocab: int
    n_embd: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # key length per head
    value_dim: int  # value length per head
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_neox: bool
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float = 1.0
    rope_freq_base_swa: float = 10000.0
    sliding_window: int = 0  # tokens a sliding-window layer sees (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: is it a sliding-window layer
    attn_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float = 1.0  # multiplier on token embeddings
    activation: str = "silu"
    scale_query: bool = False  # attention scale applied to Q (before its f16 rounding), not to Q.K
    final_logit_softcap: float = 0.0  # 0: none
    rope_freq_factors: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("n_vocab", "n_embd", "n_layers", "n_heads", "n_kv_heads", "head_dim", "value_dim", "n_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 0 < self.n_rot <= self.head_dim or self.n_rot % 2:
            raise ValueError(f"model config: rope dimension count {self.n_rot} must be even and in (0, {self.head_dim}]")
        if self.rms_eps <= 0:
            raise ValueError(f"model config: rms_eps must be > 0, got {self.rms_eps}")
        if self.activation not in ("silu", "gelu"):
            raise ValueError(f"model config: activation must be 'silu' or 'gelu', got {self.activation!r}")
        if self.swa_layers and len(self.swa_layers) != self.n_layers:
            raise ValueError(f"model config: swa_layers has {len(self.swa_layers)} entries for {self.n_layers} layers")
        if any(self.swa_layers) and self.sliding_window <= 0:
            raise ValueError("model config: sliding-window layers need sliding_window > 0")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.attn_scale if self.attn_scale > 0 else 1.0 / math.sqrt(self.head_dim)

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    def window(self, layer: int) -> int:
        return self.sliding_window if self.is_swa(layer) else 0

    def rope_spec(self, layer: int) -> RopeSpec:
        # llama.cpp: sliding-window layers use their own base and no frequency scaling
        if self.is_swa(layer):
            return RopeSpec(self.n_rot, self.rope_freq_base_swa, 1.0, self.rope_neox, None)
        return RopeSpec(self.n_rot, self.rope_freq_base, self.rope_freq_scale, self.rope_neox, self.rope_freq_factors)

    @classmethod
    def from_gguf(cls, g) -> "ModelConfig":
        """Read the hyperparameters of GGUFFile `g` (metadata plus the token_embd shape)."""
        arch = g.architecture
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        traits = ARCHITECTURES[arch]

        def key(name, default=None, required=False):
            value = g.get(f"{arch}.{name}", default)
            if required and value is None:
                raise ValueError(f"GGUF metadata is missing required key '{arch}.{name}'")
            return value

        def per_layer_uniform(name, value):
            # some files store per-layer arrays; this engine needs one value for all layers
            if isinstance(value, (np.ndarray, list)):
                values = set(int(v) for v in value)
                if len(values) != 1:
                    raise ValueError(f"'{arch}.{name}' varies per layer ({sorted(values)}); not supported")
                return values.pop()
            return int(value)

        n_embd = int(key("embedding_length", required=True))
        n_layers = int(key("block_count", required=True))
        n_heads = per_layer_uniform("attention.head_count", key("attention.head_count", required=True))
        n_kv_heads = per_layer_uniform("attention.head_count_kv", key("attention.head_count_kv", n_heads))
        n_ff = per_layer_uniform("feed_forward_length", key("feed_forward_length", required=True))
        if n_heads <= 0:
            raise ValueError(f"'{arch}.attention.head_count' must be > 0, got {n_heads}")
        head_dim = int(key("attention.key_length", n_embd // n_heads))
        value_dim = int(key("attention.value_length", head_dim))
        n_rot = int(key("rope.dimension_count", head_dim))

        if "token_embd.weight" not in g.tensors:
            raise ValueError("GGUF file has no 'token_embd.weight' tensor")
        n_vocab = int(g.tensors["token_embd.weight"].dims[1])

        freq_scale = 1.0
        scaling_type = key("rope.scaling.type", "none")
        factor = key("rope.scaling.factor", key("rope.scale_linear", 0.0))
        if scaling_type not in ("none", "linear"):
            raise ValueError(f"rope scaling type {scaling_type!r} is not supported (supported: none, linear)")
        if scaling_type == "linear" and factor:
            freq_scale = 1.0 / float(factor)

        freq_factors = None
        if "rope_freqs.weight" in g.tensors:  # Llama 3.1+ per-pair frequency divisors
            info = g.tensors["rope_freqs.weight"]
            if int(info.ggml_type) != 0 or info.n_elements != n_rot // 2:
                raise ValueError(f"rope_freqs.weight must be F32 with {n_rot // 2} elements")
            freq_factors = np.frombuffer(info.data, np.float32).copy()

        swa_layers: tuple[bool, ...] = ()
        sliding_window = 0
        if traits.swa_period:
            sliding_window = int(key("attention.sliding_window", 0))
            pattern = key("attention.sliding_window_pattern", traits.swa_period)
            if isinstance(pattern, (np.ndarray, list)):
                swa_layers = tuple(bool(v) for v in pattern)
            elif sliding_window > 0:
                period = int(pattern)
                swa_layers = tuple(period > 0 and layer % period < period - 1 for layer in range(n_layers))

        attn_scale = 0.0
        if arch == "gemma3" and n_layers == 62:
            # llama.cpp: Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head), not 1/sqrt(head_dim)
            attn_scale = 1.0 / math.sqrt(n_embd / n_heads)

        return cls(
            architecture=arch, n_vocab=n_vocab, n_embd=n_embd, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=head_dim, value_dim=value_dim, n_ff=n_ff,
            n_ctx_train=int(key("context_length", 2048)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_neox=traits.rope_neox, n_rot=n_rot,
            rope_freq_base=float(key("rope.freq_base", 10000.0)), rope_freq_scale=freq_scale,
            rope_freq_base_swa=float(key("rope.freq_base_swa", traits.swa_freq_base)),
            sliding_window=sliding_window, swa_layers=swa_layers, attn_scale=attn_scale,
            qkv_bias=traits.qkv_bias, qk_norm=traits.qk_norm, post_norms=traits.post_norms,
            embed_scale=math.sqrt(n_embd) if traits.embed_scale else 1.0,
            activation=traits.activation, scale_query=traits.scale_query,
            final_logit_softcap=float(key("final_logit_softcapping", 0.0) or 0.0) if arch != "gemma3" else 0.0,
            rope_freq_factors=freq_factors,
        )
