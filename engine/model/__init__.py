"""The model: GGUF file -> weights -> forward pass, built from kernel calls.

Owns the GGUF reader (`gguf.py`: memory-mapped, bounds-checked), hyperparameters from its metadata
(`config.py`: `ModelConfig`, `SUPPORTED_ARCHITECTURES`; differences between families are flags,
not forks), the weights (`weights.py`), scratch buffers (`scratch.py`) and the forward pass over a
flat mixed batch (`model.py`: `Model`, `load_model(g, n_slots, n_ctx, kv_dtype, repack)`).

The package imports nothing itself, so reading a GGUF header (`ggserve tokenize`, `ggserve info`)
does not import numba and the kernels; import from the modules.
"""
