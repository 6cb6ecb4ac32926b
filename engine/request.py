"""Requests and their results: what one completion asks for and what the engine sends back.

Owns `GenerationParams` (per-request knobs, validated), `Request` (the engine's mutable record of
one completion: its tokens, slot, progress, timing), `RequestOutput` (one delta pushed to the
caller), `Timings` (llama-server's `timings` object) and the admission errors the server maps to
HTTP statuses (`PromptTooLongError` -> 400, `EngineBusyError` -> 503).
"""
from __future__ import annotations

import dataclasses

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ggserve.engine.sampling.sampler import SamplingParams


class EngineError(RuntimeError):
    """The engine failed while running a request (a bug or a model error); -> HTTP 500."""


class EngineBusyError(RuntimeError):
    """The waiting queue is full; the server answers 503 and the client retries later."""


class PromptTooLongError(ValueError):
    """The prompt does not fit a slot's context; -> HTTP 400 (llama.cpp: exceed_context_size)."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int):
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"request ({n_prompt_tokens} tokens) exceeds the available context size "
            f"({n_ctx} tokens), try increasing it"
        )


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens reached or the context is full
    ABORT = "abort"  # cancelled by the client or by shutdown


class StopType(str, enum.Enum):
    """llama-server's `stop_type` field."""

    NONE = "none"
    EOS = "eos"
    WORD = "word"
    LIMIT = "limit"


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the FIFO queue, no slot yet
    RUNNING = "running"  # owns a slot (prompt processing or generating)
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass
class GenerationParams:
    """Per-request generation settings (llama-server names in comments).

    max_tokens: n_predict; -1 = until EOS / stop / full context (or the server's --n-predict).
    stop: stop strings; the matched string and anything after it are never output.
    n_probs: when > 0, report the sampled token's logprob and the top n alternatives per token.
    cache_prompt: reuse the slot's cached prefix (only the new suffix is computed).
    id_slot: pin the request to this slot (-1 = choose automatically); it waits while busy.
    n_keep: tokens kept at the start on a context shift (-1 = the whole prompt).
    """

    max_tokens: int = -1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n_probs: int = 0
    cache_prompt: bool = True
    id_slot: int = -1
    n_keep: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        # Empty stop strings would match everywhere; llama.cpp ignores them too.
        self.stop = [s for s in self.stop if s]
        for name in ("max_tokens", "n_probs", "id_slot", "n_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_tokens < -1:
            raise ValueError(f"max_tokens must be >= -1 (-1 = unlimited), got {self.max_tokens}")
        if self.n_probs < 0:
            raise ValueError(f"n_probs must be >= 0, got {self.n_probs}")
        if self.id_slot < -1:
            raise ValueError(f"id_slot must be >= -1 (-1 = any slot), got {self.id_slot}")
        if self.n_keep < -1:
            raise ValueError(f"n_keep must be >= -1 (-1 = keep the whole prompt), got {self.n_keep}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError("sampling must be a SamplingParams")
        self.ignore_eos = bool(self.ignore_eos) or bool(self.sampling.ignore_eos)
        if self.ignore_eos and not self.sampling.ignore_eos:
            # The sampler bans EOG through logit bias, as llama.cpp does, so the probabilities
            # it reports are still those of the untouched model logits.
            self.sampling = dataclasses.replace(self.sampling, ignore_eos=True)
        self.cache_prompt = bool(self.cache_prompt)

    @property
    def logprobs_n(self) -> int:
        """How many top alternatives to report (either field may ask for them)."""
        return max(self.n_probs, int(getattr(self.sampling, "n_probs", 0) or 0))


@dataclass(frozen=True)
class Timings:
    """llama-server's `timings`: prompt = tokens computed (cache hits excluded), predicted = sampled."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cache_n: int = 0

    @property
    def prompt_per_token_ms(self) -> float:
        return self.prompt_ms / self.prompt_n if self.prompt_n else 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1e3 * self.prompt_n / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_token_ms(self) -> float:
        return self.predicted_ms / self.predicted_n if self.predicted_n else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1e3 * self.predicted_n / self.predicted_ms if self.predicted_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """The JSON object llama-server returns under `timings`."""
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": self.prompt_per_token_ms,
            "prompt_per_second": self.prompt_per_second,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": self.predicted_per_token_ms,
            "predicted_per_second": self.predicted_per_second,
        }


@dataclass(frozen=True)
class TokenProbs:
    """Logprob of one sampled token plus the top-n alternatives (ggserve.engine.sampling.sampler.TokenLogprob)."""

    token_id: int
    logprob: float
    top: tuple[Any, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One delta for one request. Text is UTF-8 complete and never contains (part of) a stop string."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_type: str = StopType.NONE.value
    stopping_word: str = ""
    logprobs: list[TokenProbs] | None = None  # one entry per new token when n_probs > 0
    timings: Timings = field(default_factory=Timings)
    slot_id: int = -1
    n_prompt_tokens: int = 0
    truncated: bool = False  # the context filled up (or was shifted) during this request
    error: str | None = None  # set (with finish_reason "abort") when this request failed alone

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


class Request:
    """The engine's record of one completion.

    `tokens` mirrors the slot's context: prompt tokens then generated ones (a context shift removes
    a middle span). The first `num_computed_tokens` of them have K/V in the slot's cache; the
    rest (the unprocessed prompt suffix, or the last sampled token) are computed by the next steps.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationParams,
        sampler: Any = None,
        stop_checker: Any = None,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = sampler
        self.stop_checker = stop_checker
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time

        self.tokens: list[int] = list(self.prompt_ids)
        self.output_ids: list[int] = []
        self.num_computed_tokens = 0
        self.slot_id = -1
        self.status = RequestStatus.WAITING
        self.stop_type = StopType.NONE
        self.stopping_word = ""
        self.truncated = False
        self.error: str | None = None
        self.prompt_accepted = False  # prompt fed into the sampler's penalty history

        self.cache_n = 0  # prompt tokens reused from the slot's cache
        self.t_prompt_start: float | None = None  # admitted to a slot
        self.t_first_token: float | None = None  # prompt done, first token sampled
        self.t_last_token: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_decoded(self) -> int:
        return len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """Still processing its prompt (no token sampled yet)."""
        return not self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def finish(self, status: RequestStatus, stop_type: StopType = StopType.NONE, word: str = "") -> None:
        self.status = status
        if stop_type is not StopType.NONE:
            self.stop_type = stop_type
            self.stopping_word = word

    def timings(self, now: float | None = None) -> Timings:
        """Timings as llama-server reports them (prompt phase ends when the first token is sampled)."""
        now = time.perf_counter() if now is None else now
        prompt_ms = 0.0
        predicted_ms = 0.0
        if self.t_prompt_start is not None:
            end = self.t_first_token if self.t_first_token is not None else now
            prompt_ms = 1e3 * (end - self.t_prompt_start)
        if self.t_first_token is not None and self.t_last_token is not None:
            predicted_ms = 1e3 * (self.t_last_token - self.t_first_token)
        return Timings(
            prompt_n=max(0, len(self.prompt_ids) - self.cache_n) if self.t_prompt_start is not None else 0,
            prompt_ms=prompt_ms,
            predicted_n=self.n_decoded,
            predicted_ms=predicted_ms,
            cache_n=self.cache_n,
        )
