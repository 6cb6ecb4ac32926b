"""Stop conditions on generated text: EOS tokens and stop strings, with stop-string hold-back.

`StopChecker` turns one request's sampled tokens into text that is safe to send: UTF-8 complete
(via an incremental detokenizer), never containing a stop string or anything after it, and never
containing a tail that could still grow into a stop string (that tail is held back until the
next token decides it). Length limits (max_tokens, full context) are the scheduler's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ggserve.engine.request import StopType


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


@dataclass(frozen=True)
class StopResult:
    text: str  # text that may be sent now
    stop_type: StopType = StopType.NONE  # EOS or WORD when this token ends the generation
    stopping_word: str = ""


def find_stop(text: str, stop: list[str]) -> tuple[int, str]:
    """Earliest position of any stop string in text -> (pos, word), or (-1, "")."""
    best_pos, best_word = -1, ""
    for word in stop:
        pos = text.find(word)
        if pos != -1 and (best_pos == -1 or pos < best_pos):
            best_pos, best_word = pos, word
    return best_pos, best_word


def partial_stop_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for word in stop:
        for k in range(min(len(word) - 1, len(text)), best, -1):
            if text.endswith(word[:k]):
                best = k
                break
    return best


class StopChecker:
    """Per-request text assembly and EOS / stop-string detection."""

    def __init__(
        self,
        detokenizer: Detokenizer,
        stop: list[str],
        is_eog: Callable[[int], bool],
        ignore_eos: bool = False,
    ):
        self.detokenizer = detokenizer
        self.stop = list(stop)
        self.is_eog = is_eog
        self.ignore_eos = ignore_eos
        self.pending = ""  # decoded text not sent yet (a possible stop-string prefix)
        self.text = ""  # all text sent so far
        self.stopped = False

    def add(self, token_id: int) -> StopResult:
        """Feed one sampled token; return what can be sent and whether generation stops here."""
        if self.stopped:
            raise RuntimeError("StopChecker.add after a stop")
        self.pending += self.detokenizer.add(token_id)
        # With ignore_eos the sampler never picks an EOG token (its logit is -inf), so a check
        # here only matters when ignore_eos is off.
        eos = not self.ignore_eos and self.is_eog(token_id)
        pos, word = find_stop(self.pending, self.stop)
        if pos != -1:
            # llama-server: the stop string and everything after it are dropped; an EOG token that
            # also completes a stop string still reports stop_type "eos" (its check runs last).
            return self._stop(self.pending[:pos], StopType.EOS if eos else StopType.WORD, "" if eos else word)
        if eos:
            return self._stop(self.pending + self.detokenizer.flush(), StopType.EOS, "")
        hold = partial_stop_len(self.pending, self.stop)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        self.text += out
        return StopResult(out)

    def flush(self) -> str:
        """Generation ended for another reason (length, abort): release the held-back text."""
        if self.stopped:
            return ""
        self.stopped = True
        tail = self.pending + self.detokenizer.flush()
        self.pending = ""
        pos, _ = find_stop(tail, self.stop)
        if pos != -1:
            tail = tail[:pos]
        self.text += tail
        return tail

    def _stop(self, out: str, stop_type: StopType, word: str) -> StopResult:
        self.stopped = True
        self.pending = ""
        self.text += out
        return StopResult(out, stop_type, word)
