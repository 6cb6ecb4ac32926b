"""Prompts -> token ids: plain and mixed prompts, chat messages via the template, FIM infill.

Owns: llama-server's prompt shapes ("text", [ids], [ids and "text" mixed], or a list of those
for several prompts), token-id validation against the vocabulary, the context-size check,
turning OpenAI chat messages into template input (and the template's output into tokens
without a doubled BOS), and the fill-in-the-middle layout of /infill.
Tokenizing a long prompt is CPU work, so callers run these in a worker thread.
"""
from __future__ import annotations

from typing import Any

import jinja2

from ggserve.server.chat.template import ChatTemplateError
from ggserve.server.errors import APIError, bad_request, context_exceeded
from ggserve.server.protocol import ChatMessage, InfillChunk


def split_prompts(prompt: Any) -> list[list[Any]]:
    """llama-server's rules: a string or a flat list with any int is ONE prompt; a list of
    strings / lists is several prompts. Each prompt becomes a list of str | int pieces."""
    if isinstance(prompt, str):
        return [[prompt]]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt must be a string, a list of token ids / strings, or a list of those", "prompt")
    if any(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [_check_pieces(prompt)]
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append([p])
        elif isinstance(p, list) and p:
            prompts.append(_check_pieces(p))
        else:
            raise bad_request("each prompt must be a string or a non-empty list of token ids / strings", "prompt")
    return prompts


def _check_pieces(pieces: list[Any]) -> list[Any]:
    for p in pieces:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise bad_request("a prompt list may hold only token ids (integers) and strings", "prompt")
    return pieces


def validate_token_ids(token_ids: list[int], n_vocab: int, param: str = "prompt") -> None:
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            raise bad_request(f"invalid token id {t!r}: the vocabulary has ids 0..{n_vocab - 1}", param)


def tokenize_pieces(tokenizer: Any, pieces: list[Any], add_special: bool = True) -> list[int]:
    """Mixed prompt -> ids; as llama.cpp, special tokens are added for the first text piece only."""
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            ids.extend(tokenizer.encode(piece, add_special=add_special and i == 0, parse_special=True))
        else:
            ids.append(piece)
    validate_token_ids(ids, tokenizer.n_vocab)
    return ids


def check_fits(token_ids: list[int], n_ctx_slot: int) -> None:
    if not token_ids:
        raise bad_request("the prompt is empty", "prompt")
    if len(token_ids) >= n_ctx_slot:
        raise context_exceeded(len(token_ids), n_ctx_slot)


# ---- chat ---------------------------------------------------------------------------------------


def message_to_dict(message: ChatMessage) -> dict[str, Any]:
    """One OpenAI message as the template sees it: content parts joined into one string."""
    data = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"message content of type {part.type!r} is not supported (text only)", "messages")
            texts.append(part.text)
        data["content"] = "\n".join(texts)
    elif content is None:
        data["content"] = "" if not message.tool_calls else None
    return data


def render_chat(
    template: Any,
    messages: list[ChatMessage],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    extra: dict[str, Any] | None = None,
) -> str:
    dicts = [message_to_dict(m) for m in messages]
    try:
        return template.render(dicts, add_generation_prompt=add_generation_prompt, tools=tools, **(extra or {}))
    except (ChatTemplateError, jinja2.TemplateError, TypeError, ValueError) as exc:
        raise bad_request(f"chat template error: {exc}", "messages") from None


def tokenize_chat_prompt(tokenizer: Any, text: str) -> list[int]:
    """The rendered template may start with the BOS text; drop it when the tokenizer adds BOS
    itself, so the prompt never starts with two BOS tokens (llama.cpp does the same)."""
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        bos_text = tokenizer.token_text(tokenizer.bos_id)
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
    ids = tokenizer.encode(text, add_special=True, parse_special=True)
    validate_token_ids(ids, tokenizer.n_vocab)
    return ids


# ---- infill -------------------------------------------------------------------------------------


def infill_tokens(
    tokenizer: Any,
    prefix: str,
    suffix: str,
    extra: list[InfillChunk],
    prompt_ids: list[int],
    n_batch: int,
    n_ctx: int,
    n_predict: int,
) -> list[int]:
    """llama-server's FIM layout: [extra context] [BOS] <PRE> prefix prompt <SUF> suffix <MID>.

    The prefix keeps its last 3/4 of a batch, the suffix its first 1/4 (minus the prompt);
    extra chunks (repo-level files, `<|file_sep|>name\\ntext`) fill what is left of the context.
    """
    pre, suf, mid = tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id
    if pre is None or suf is None or mid is None:
        raise APIError(501, "the model has no fill-in-the-middle tokens (prefix, suffix and middle are needed)")
    rep = getattr(tokenizer, "fim_repo_id", None)
    sep = getattr(tokenizer, "fim_sep_id", None)
    pad = getattr(tokenizer, "fim_pad_id", None)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special=False, parse_special=False)

    extra_ids: list[int] = []
    if rep is not None:
        extra_ids += [rep] + encode("myproject\n")
    for chunk in extra:
        if sep is not None:
            extra_ids += [sep] + encode(chunk.filename + "\n")
        elif pad is not None:
            extra_ids.append(pad)
        extra_ids += encode(chunk.text)
    if sep is not None:
        extra_ids += [sep] + encode("filename\n")

    prefix_ids, suffix_ids = encode(prefix), encode(suffix)
    n_prefix_take = min(len(prefix_ids), 3 * (n_batch // 4))
    n_suffix_take = min(len(suffix_ids), max(0, n_batch // 4 - (2 + len(prompt_ids))))
    n_extra_take = min(max(0, n_ctx - n_batch - 2 * max(n_predict, 0)), len(extra_ids))

    prefix_ids = prefix_ids[len(prefix_ids) - n_prefix_take:]
    suffix_ids = suffix_ids[:n_suffix_take]
    tokens = extra_ids[len(extra_ids) - n_extra_take:] if n_extra_take else []
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        tokens.append(tokenizer.bos_id)
    tokens += [pre] + prefix_ids + list(prompt_ids) + [suf] + suffix_ids + [mid]
    return tokens
