"""Request bodies as pydantic models, field names and meanings as llama-server / OpenAI.

Owns: one model per endpoint family, the bounds every field must satisfy (a violation becomes a
400 envelope before any work starts), and `parse_body`, which reads the raw body so that a
missing or non-JSON body is a 400 too. Unknown fields are ignored (extra="ignore").
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ggserve.server.errors import APIError, _describe_validation

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # OpenAI: {"name", "schema", "strict"}
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp shorthand


class SamplingFields(_Body):
    """Sampling and stopping fields shared by every generating endpoint (llama.cpp names)."""

    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, ge=0, le=1)
    top_n_sigma: float | None = None
    repeat_penalty: float | None = Field(default=None, ge=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: float | None = Field(default=None, ge=0)
    dry_base: float | None = None
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    xtc_probability: float | None = Field(default=None, ge=0, le=1)
    xtc_threshold: float | None = Field(default=None, ge=0)
    dynatemp_range: float | None = Field(default=None, ge=0)
    dynatemp_exponent: float | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    adaptive_target: float | None = None  # clamped to <= 1 (llama-server's soft limit); < 0 disables
    adaptive_decay: float | None = Field(default=None, ge=0, le=0.99)  # llama-server's hard limit
    min_keep: int | None = Field(default=None, ge=0)
    seed: int | None = None
    logit_bias: Union[dict[str, Union[float, bool]], list[list[Any]], None] = None
    n_probs: int | None = Field(default=None, ge=0)
    samplers: Union[list[str], str, None] = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    stop: Union[str, list[str], None] = None
    ignore_eos: bool = False
    cache_prompt: bool = True
    id_slot: int = Field(default=-1, ge=-1)
    n_keep: int = Field(default=0, ge=-1)
    n_predict: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = None
    # choices per prompt (OpenAI endpoints; each is its own engine request, queued when the
    # slots are busy); OpenAI's own limit
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)

    @field_validator("adaptive_target")
    @classmethod
    def _clamp_adaptive_target(cls, value: float | None) -> float | None:
        return value if value is None else min(value, 1.0)


class CompletionRequest(SamplingFields):
    """POST /completion (llama.cpp native) and POST /v1/completions (OpenAI legacy)."""

    prompt: Any = ""
    return_tokens: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI legacy: top-N
    echo: bool = False
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # extra="allow": templates may read fields we do not know (e.g. "thinking")
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatFields(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class ChatCompletionRequest(ChatFields, SamplingFields):
    """POST /v1/chat/completions."""

    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be set to true")
        return self


class ApplyTemplateRequest(ChatFields):
    """POST /apply-template."""


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class EmbeddingRequest(_Body):
    input: Union[str, list[str], list[int], list[list[int]], None] = None
    content: Union[str, list[str], list[int], list[list[int]], None] = None  # llama.cpp native
    encoding_format: Literal["float", "base64"] = "float"
    model: str | None = None

    @model_validator(mode="after")
    def _has_input(self):
        if self.input is None and self.content is None:
            raise ValueError("'input' (or 'content') is required")
        return self


class InfillChunk(_Body):
    filename: str = "tmp"
    text: str


class InfillRequest(SamplingFields):
    """POST /infill: fill-in-the-middle with the model's FIM tokens."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field(default_factory=list)
    prompt: Any = ""
    return_tokens: bool = False


class SlotActionRequest(_Body):
    filename: str | None = None


class PropsUpdate(_Body):
    """POST /props (with --props): the only writable property is the default sampling settings,
    checked field by field with SamplingFields' bounds."""

    default_generation_settings: dict[str, Any] | None = None


# Bodies above this size are parsed and validated on a worker thread: a few megabytes of JSON take
# tens of milliseconds the event loop must not spend. Smaller ones inline (a thread hop costs more).
INLINE_PARSE_BYTES = 64 << 10
# a JSON \u escape of a UTF-16 surrogate; json.loads joins valid pairs and keeps lone ones
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def validate_model(model: type[BaseModel], data: Any, prefix: str = "") -> BaseModel:
    """`model` from plain data; a violation is a 400 naming the field (under `prefix`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _describe_validation(exc.errors())
        if prefix:
            message, param = f"{prefix}.{message}", f"{prefix}.{param}" if param else prefix
        raise APIError(400, message, param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


def decode_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Blocking: the JSON body as `model`; every problem is a 400 envelope."""
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then pay for a full re-encode
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request holds a lone UTF-16 surrogate (\\ud800-\\udfff): "
                                "not valid Unicode") from None
    return validate_model(model, data)


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Read and validate the JSON body (off the event loop when it is large)."""
    raw = await request.body()
    if len(raw) > INLINE_PARSE_BYTES:
        return await run_in_threadpool(decode_body, raw, model)
    return decode_body(raw, model)
