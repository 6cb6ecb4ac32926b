"""Model architectures built from kernel calls; differences between families are config flags.

Exports `load_model(g, n_slots, n_ctx, kv_dtype, repack)`, `Model` (forward over a flat mixed batch),
`ModelConfig` (hyperparameters from GGUF metadata) and `SUPPORTED_ARCHITECTURES`.
"""
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .model import Model, load_model

__all__ = ["Model", "ModelConfig", "SUPPORTED_ARCHITECTURES", "load_model"]
