"""Named chat templates for `--chat-template NAME`, written as Jinja sources.

Owns: one Jinja source per name in llama.cpp's built-in template list (src/llama-chat.cpp),
each written to produce byte-for-byte what llama.cpp's C++ formatter produces for that name,
quirks included (llama2 ignores add_generation_prompt, gemma folds the system prompt into the
first user turn, several formats trim ASCII whitespace around the content...). They are
rendered by `ggserve.server.chat.template.ChatTemplate` like any other template; every tag uses `-` on
both sides and all output is in string literals, so the layout below adds no whitespace.
"""
from __future__ import annotations

# C++'s isspace() set: `trim()` in llama-chat.cpp strips exactly these (not Unicode spaces).
_TRIM = r"content.strip(' \t\n\r\v\f')"


def _per_message(body: str, generation_prompt: str = "", prelude: str = "") -> str:
    """A template that emits `body` for each message and `generation_prompt` at the end."""
    tail = ""
    if generation_prompt:
        tail = "{%- if add_generation_prompt -%}{{- " + generation_prompt + " -}}{%- endif -%}"
    return (prelude + "{%- for message in messages -%}{%- set role = message.role -%}"
            "{%- set content = message.content -%}" + body + "{%- endfor -%}" + tail)


def _llama2(system_tags: bool, bos_in_history: bool, strip: bool) -> str:
    content = _TRIM if strip else "content"
    system = (r"{{- '<<SYS>>\n' + c + '\n<</SYS>>\n\n' -}}" if system_tags else r"{{- c + '\n' -}}")
    reopen = "'<s>[INST] '" if bos_in_history else "'[INST] '"
    return ("{%- set ns = namespace(inside_turn=true) -%}{{- '[INST] ' -}}"
            "{%- for message in messages -%}{%- set content = message.content -%}"
            "{%- set c = " + content + " -%}"
            "{%- if not ns.inside_turn -%}{%- set ns.inside_turn = true -%}{{- " + reopen +
            " -}}{%- endif -%}"
            "{%- if message.role == 'system' -%}" + system +
            "{%- elif message.role == 'user' -%}{{- c + ' [/INST]' -}}"
            "{%- else -%}{{- c + '</s>' -}}{%- set ns.inside_turn = false -%}{%- endif -%}"
            "{%- endfor -%}")


def _mistral_v1_v3(leading: str, trailing: str, trim_assistant: bool) -> str:
    assistant = _TRIM if trim_assistant else "content"
    return ("{%- set ns = namespace(inside_turn=false) -%}"
            "{%- for message in messages -%}{%- set content = message.content -%}"
            "{%- if not ns.inside_turn -%}{{- '" + leading + "[INST]" + trailing + "' -}}"
            "{%- set ns.inside_turn = true -%}{%- endif -%}"
            r"{%- if message.role == 'system' -%}{{- content + '\n\n' -}}"
            "{%- elif message.role == 'user' -%}{{- content + '" + leading + "[/INST]' -}}"
            "{%- else -%}{{- '" + trailing + "' + " + assistant + " + '</s>' -}}"
            "{%- set ns.inside_turn = false -%}{%- endif -%}{%- endfor -%}")


def _mistral_v7(space: str) -> str:
    return _per_message(
        "{%- if role == 'system' -%}{{- '[SYSTEM_PROMPT]" + space + "' + content + "
        "'[/SYSTEM_PROMPT]' -}}"
        "{%- elif role == 'user' -%}{{- '[INST]" + space + "' + content + '[/INST]' -}}"
        "{%- else -%}{{- '" + space + "' + content + '</s>' -}}{%- endif -%}")


def _by_role(cases: dict[str, str], other: str = "") -> str:
    """`if role == ...` chain over `cases` (role -> Jinja expression), `other` for the rest."""
    parts = []
    for i, (role, expr) in enumerate(cases.items()):
        parts.append(("{%- if" if i == 0 else "{%- elif") + f" role == '{role}' -%}}{{{{- {expr} -}}}}")
    if other:
        parts.append("{%- else -%}{{- " + other + " -}}")
    return "".join(parts) + "{%- endif -%}"


_GEMMA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}{%- set content = message.content -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + " + _TRIM + " -%}"
    "{%- else -%}{%- set role = 'model' if message.role == 'assistant' else message.role -%}"
    r"{{- '<start_of_turn>' + role + '\n' -}}"
    "{%- if ns.system and role != 'model' -%}"
    r"{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    r"{{- " + _TRIM + r" + '<end_of_turn>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

_ORION = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + message.content -%}"
    "{%- elif message.role == 'user' -%}{{- 'Human: ' -}}"
    r"{%- if ns.system -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    r"{{- message.content + '\n\nAssistant: </s>' -}}"
    "{%- else -%}{{- message.content + '</s>' -}}{%- endif -%}{%- endfor -%}"
)

_GIGACHAT = (
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- if has_system -%}{{- '<s>' + messages[0].content + '<|message_sep|>' -}}"
    "{%- else -%}{{- '<s>' -}}{%- endif -%}"
    "{%- for message in messages[1 if has_system else 0:] -%}"
    "{%- if message.role == 'user' -%}{{- 'user<|role_sep|>' + message.content + "
    "'<|message_sep|>available functions<|role_sep|>[]<|message_sep|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- 'assistant<|role_sep|>' + message.content + '<|message_sep|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant<|role_sep|>' -}}{%- endif -%}"
)

_RWKV_WORLD = _per_message(_by_role({
    "system": r"'System: ' + " + _TRIM + r" + '\n\n'",
    "user": r"'User: ' + " + _TRIM + r" + '\n\n' + ('Assistant:' if loop.last else '')",
    "assistant": r"'Assistant: ' + " + _TRIM + r" + '\n\n'",
}))

_HUNYUAN_DENSE = _per_message(
    "{%- if loop.first -%}{{- '<｜hy_begin▁of▁sentence｜>' -}}{%- if role == 'system' -%}"
    "{{- content + '<｜hy_place▁holder▁no▁3｜>' -}}{%- endif -%}{%- endif -%}"
    + _by_role({"assistant": "'<｜hy_Assistant｜>' + content + '<｜hy_place▁holder▁no▁2｜>'",
                "user": "'<｜hy_User｜>' + content"}),
) + ("{%- if add_generation_prompt -%}{{- '<｜hy_Assistant｜>' -}}"
     "{%- else -%}{{- '<｜hy_place▁holder▁no▁8｜>' -}}{%- endif -%}")

# Granite 4.x: a tool call is an assistant turn marked with <|tool_call|>.
_GRANITE_4 = _per_message(
    "{%- if role == 'assistant_tool_call' -%}"
    "{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' -}}"
    "{%- else -%}{{- '<|start_of_role|>' + role + '<|end_of_role|>' -}}{%- endif -%}"
    r"{{- content + '<|end_of_text|>\n' -}}", "'<|start_of_role|>assistant<|end_of_role|>'")

_EXAONE_ROLES = {
    "system": r"'[|system|]' + " + _TRIM + r" + '[|endofturn|]\n'",
    "user": r"'[|user|]' + " + _TRIM + r" + '\n'",
    "assistant": r"'[|assistant|]' + " + _TRIM + r" + '[|endofturn|]\n'",
}

BUILTIN_SOURCES: dict[str, str] = {
    "chatml": _per_message(r"{{- '<|im_start|>' + role + '\n' + content + '<|im_end|>\n' -}}",
                           r"'<|im_start|>assistant\n'"),
    "llama2": _llama2(system_tags=False, bos_in_history=False, strip=False),
    "llama2-sys": _llama2(system_tags=True, bos_in_history=False, strip=False),
    "llama2-sys-bos": _llama2(system_tags=True, bos_in_history=True, strip=False),
    "llama2-sys-strip": _llama2(system_tags=True, bos_in_history=False, strip=True),
    "mistral-v1": _mistral_v1_v3(leading=" ", trailing=" ", trim_assistant=False),
    "mistral-v3": _mistral_v1_v3(leading="", trailing=" ", trim_assistant=True),
    "mistral-v3-tekken": _mistral_v1_v3(leading="", trailing="", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": _per_message(r"{{- '<|' + role + '|>\n' + content + '<|end|>\n' -}}",
                         r"'<|assistant|>\n'"),
    "phi4": _per_message("{{- '<|im_start|>' + role + '<|im_sep|>' + content + '<|im_end|>' -}}",
                         "'<|im_start|>assistant<|im_sep|>'"),
    "falcon3": _per_message(r"{{- '<|' + role + '|>\n' + content + '\n' -}}", r"'<|assistant|>\n'"),
    "zephyr": _per_message(r"{{- '<|' + role + '|>\n' + content + '<|endoftext|>\n' -}}",
                           r"'<|assistant|>\n'"),
    "monarch": _per_message(r"{{- ('' if loop.first else '<s>') + role + '\n' + content + '</s>\n' -}}",
                            r"'<s>assistant\n'"),
    "gemma": _GEMMA,
    "orion": _ORION,
    "openchat": _per_message(
        "{%- if role == 'system' -%}{{- content + '<|end_of_turn|>' -}}{%- else -%}"
        "{{- 'GPT4 Correct ' + role[:1].upper() + role[1:] + ': ' + content + '<|end_of_turn|>' -}}"
        "{%- endif -%}", "'GPT4 Correct Assistant:'"),
    "vicuna": _per_message(_by_role({
        "system": r"content + '\n\n'", "user": r"'USER: ' + content + '\n'",
        "assistant": r"'ASSISTANT: ' + content + '</s>\n'"}), "'ASSISTANT:'"),
    "vicuna-orca": _per_message(_by_role({
        "system": r"'SYSTEM: ' + content + '\n'", "user": r"'USER: ' + content + '\n'",
        "assistant": r"'ASSISTANT: ' + content + '</s>\n'"}), "'ASSISTANT:'"),
    "deepseek": _per_message(_by_role({
        "system": "content", "user": r"'### Instruction:\n' + content + '\n'",
        "assistant": r"'### Response:\n' + content + '\n<|EOT|>\n'"}), r"'### Response:\n'"),
    "deepseek2": _per_message(_by_role({
        "system": r"content + '\n\n'", "user": r"'User: ' + content + '\n\n'",
        "assistant": "'Assistant: ' + content + '<｜end▁of▁sentence｜>'"}), "'Assistant:'"),
    "deepseek3": _per_message(_by_role({
        "system": r"content + '\n\n'", "user": "'<｜User｜>' + content",
        "assistant": "'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'"}), "'<｜Assistant｜>'"),
    "command-r": _per_message(_by_role({
        "system": "'<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + " + _TRIM + " + '<|END_OF_TURN_TOKEN|>'",
        "user": "'<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + " + _TRIM + " + '<|END_OF_TURN_TOKEN|>'",
        "assistant": "'<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + " + _TRIM
                     + " + '<|END_OF_TURN_TOKEN|>'"}),
        "'<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'"),
    "llama3": _per_message(
        r"{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + " + _TRIM + " + '<|eot_id|>' -}}",
        r"'<|start_header_id|>assistant<|end_header_id|>\n\n'"),
    "chatglm3": _per_message(r"{{- '<|' + role + '|>\n ' + content -}}", "'<|assistant|>'",
                             prelude="{{- '[gMASK]sop' -}}"),
    "chatglm4": _per_message(r"{{- '<|' + role + '|>\n' + content -}}", r"'<|assistant|>\n'",
                             prelude="{{- '[gMASK]<sop>' -}}"),
    "glmedge": _per_message(r"{{- '<|' + role + '|>\n' + content -}}", "'<|assistant|>'"),
    "minicpm": _per_message(_by_role({"user": "'<用户>' + " + _TRIM + " + '<AI>'"}, other=_TRIM)),
    "exaone3": _per_message(_by_role(_EXAONE_ROLES), "'[|assistant|]'"),
    "exaone4": _per_message(_by_role({**_EXAONE_ROLES,
                                      "tool": r"'[|tool|]' + " + _TRIM + r" + '[|endofturn|]\n'"}),
                            "'[|assistant|]'"),
    "rwkv-world": _RWKV_WORLD,
    "granite": _per_message(  # Granite 3.x
        "{{- '<|start_of_role|>' + role + '<|end_of_role|>' -}}"
        "{%- if role == 'assistant_tool_call' -%}{{- '<|tool_call|>' -}}{%- endif -%}"
        r"{{- content + '<|end_of_text|>\n' -}}", "'<|start_of_role|>assistant<|end_of_role|>'"),
    "granite-4.0": _GRANITE_4,
    "granite-4.1": _GRANITE_4,
    "gigachat": _GIGACHAT,
    "megrez": _per_message("{{- '<|role_start|>' + role + '<|role_end|>' + content + '<|turn_end|>' -}}",
                           "'<|role_start|>assistant<|role_end|>'"),
    "yandex": _per_message(_by_role({
        "user": r"' Пользователь: ' + content + '\n\n'",
        "assistant": r"' Ассистент: ' + content + '\n\n'"}), "' Ассистент:[SEP]'",
        prelude="{{- '<s>' -}}"),
    "bailing": _per_message(
        "{{- '<role>' + ('HUMAN' if role == 'user' else role.upper()) + '</role>' + content -}}",
        "'<role>ASSISTANT</role>'"),
    "llama4": _per_message(
        r"{{- '<|header_start|>' + role + '<|header_end|>\n\n' + " + _TRIM + " + '<|eot|>' -}}",
        r"'<|header_start|>assistant<|header_end|>\n\n'"),
    "smolvlm": _per_message(_by_role({
        "system": r"content + '\n\n'", "user": r"'User: ' + content + '<end_of_utterance>\n'"},
        other=r"'Assistant: ' + content + '<end_of_utterance>\n'"), "'Assistant:'",
        prelude="{{- '<|im_start|>' -}}"),
    "hunyuan-moe": _per_message(_by_role({
        "system": "'<|startoftext|>' + content + '<|extra_4|>'",
        "assistant": "content + '<|eos|>'"}, other="'<|startoftext|>' + content + '<|extra_0|>'")),
    "hunyuan-dense": _HUNYUAN_DENSE,
}

# Friendly aliases (not llama.cpp names): `mistral` is the current official Mistral format.
BUILTIN_ALIASES: dict[str, str] = {"mistral": "mistral-v7"}
