"""Token sampling: llama.cpp's sampler chain for one request at a time.

Owns the request's sampling settings (`params.py`: `SamplingParams`, the one sampler-name
table), `logit_bias` parsing (`logit_bias.py`, the one normaliser), the individual samplers as
pure functions (`samplers.py`; infill and adaptive-p in `samplers_extra.py`), the penalty/DRY
token history (`penalty_history.py`), and the stateful per-request `Sampler` that runs the chain
(`sampler.py`).
"""
