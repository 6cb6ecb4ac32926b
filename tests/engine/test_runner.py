"""ggserve.engine.runner: the batch span each scheduled row is summed in (see Model.forward)."""
from __future__ import annotations

from types import SimpleNamespace

from ggserve.engine.runner import _batch_span


def chunk(start_pos, n):
    return SimpleNamespace(start_pos=start_pos, token_ids=list(range(n)))


def test_prompt_rows_take_the_whole_prompts_span_and_generated_tokens_their_own():
    assert _batch_span(chunk(0, 12), 12) == (0, 11)  # a prompt fed at once
    assert _batch_span(chunk(4, 5), 12) == (0, 11)  # a middle chunk of it
    assert _batch_span(chunk(11, 1), 12) == (0, 11)  # a cache hit re-evaluating its last token
    assert _batch_span(chunk(12, 1), 12) == (12, 12)  # the first generated token
    assert _batch_span(chunk(30, 1), 12) == (30, 30)
