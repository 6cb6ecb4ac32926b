"""SEAM for tool calling: turning the model's raw reply into an OpenAI assistant message.

Today the tools are passed to the chat template (so the model sees them) and the reply is
returned as plain `content`. Parsing tool calls out of the reply (Hermes / Qwen <tool_call>,
Llama 3 JSON, Mistral [TOOL_CALLS] ...) belongs here: implement `parse_reply` for the final
message and `StreamingReplyParser.feed` for streamed deltas; the chat route already calls both
and maps a message with `tool_calls` to finish_reason "tool_calls".
"""
from __future__ import annotations

from typing import Any


def parse_reply(text: str, tools: list[dict] | None) -> dict[str, Any]:
    """The final assistant message for `text` (no tool-call parsing yet)."""
    return {"role": "assistant", "content": text}


class StreamingReplyParser:
    """Turns streamed text into OpenAI `delta` objects (no tool-call parsing yet)."""

    def __init__(self, tools: list[dict] | None):
        self.tools = tools

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return []
