"""TEMPORARY STUB (lead): greedy-only; replaced by the sampling helper with the same API."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1
    n_probs: int = 0
    logit_bias: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


class Sampler:
    def __init__(self, params: SamplingParams, n_vocab: int, eog_ids: frozenset = frozenset()):
        self.params, self.n_vocab, self.eog_ids = params, n_vocab, eog_ids

    def sample(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def accept(self, token_id: int) -> None:
        pass
