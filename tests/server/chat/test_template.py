"""Chat templates: the real templates in testdata render, built-ins match llama.cpp's C++
formatters, HF conventions hold, and hostile templates fail with ChatTemplateError."""
from __future__ import annotations

from pathlib import Path

import pytest

from ggserve.server.chat.template import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError
from tests.testdata import reference_data_dir

TEMPLATES_DIR = reference_data_dir() / "chat-templates"
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
]
QWEN_EXPECTED = ("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
                 "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def _template_files() -> list:
    if not TEMPLATES_DIR.is_dir():
        reason = f"llama.cpp's chat templates not found at {TEMPLATES_DIR} (set GGSERVE_TESTDATA)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-templates")]
    return sorted(TEMPLATES_DIR.glob("*.jinja"))


@pytest.fixture(scope="module")
def templates_dir(testdata_dir: Path) -> Path:
    return testdata_dir / "chat-templates"


def _read(templates_dir: Path, name: str) -> str:
    return (templates_dir / name).read_text(encoding="utf-8")


# -- every real template renders the plain conversation --------------------------------------
@pytest.mark.parametrize("path", _template_files(), ids=lambda p: p.stem)
def test_real_template_renders_plain_conversation(path: Path):
    template = ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
    prompt = template.render(CONVERSATION, add_generation_prompt=True)
    for message in CONVERSATION:  # nothing the user said is lost, system prompt included
        assert message["content"] in prompt, (path.name, message["role"])
    assert prompt.index("What is 2+2?") < prompt.index("It is 4.") < prompt.index("And 3+3?")


def test_templates_present(templates_dir: Path):
    assert len(list(templates_dir.glob("*.jinja"))) >= 60


def test_qwen25_template_exact(templates_dir: Path):
    template = ChatTemplate(_read(templates_dir, "Qwen-Qwen2.5-7B-Instruct.jinja"))
    messages = [CONVERSATION[0], {"role": "user", "content": "hi"}]
    assert template.render(messages) == QWEN_EXPECTED
    assert template.render(messages, add_generation_prompt=False) == QWEN_EXPECTED[:-len(
        "<|im_start|>assistant\n")]
    # No system message: Qwen's default one is used.
    assert template.render([{"role": "user", "content": "hi"}]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen25_template_renders_tools_with_hf_tojson(templates_dir: Path):
    template = ChatTemplate(_read(templates_dir, "Qwen-Qwen2.5-7B-Instruct.jinja"))
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Météo",
                                             "parameters": {"type": "object", "properties": {}}}}
    prompt = template.render([{"role": "user", "content": "hi"}], tools=[tool])
    # HF tojson: key order kept, non-ASCII kept, ", " and ": " separators.
    assert ('<tools>\n{"type": "function", "function": {"name": "get_weather", '
            '"description": "Météo", "parameters": {"type": "object", "properties": {}}}}\n</tools>'
            in prompt)


@pytest.mark.slow
def test_qwen_gguf_own_template(qwen_path):
    from ggserve.engine.model.gguf import GGUFFile

    g = GGUFFile(qwen_path)
    source = g.get("tokenizer.chat_template")
    assert isinstance(source, str) and "<|im_start|>" in source
    from ggserve.engine.tokenizer import Tokenizer

    template = ChatTemplate.for_model(g.metadata, Tokenizer.from_gguf(g))
    assert template.name == "model" and template.eos_token == "<|im_end|>"
    assert template.render([CONVERSATION[0], {"role": "user", "content": "hi"}]) == QWEN_EXPECTED


# -- sandbox and errors ----------------------------------------------------------------------
def test_sandbox_blocks_class_walk():
    template = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="sandbox violation.*unsafe"):
        template.render(CONVERSATION)


def test_sandbox_blocks_mutating_caller_dicts():
    template = ChatTemplate("{% set _ = messages[0].update({'content': 'pwned'}) %}x")
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(ChatTemplateError, match="sandbox violation"):
        template.render(messages)
    assert messages == CONVERSATION


def test_scratch_lists_may_grow_but_caller_data_is_untouched():
    # Kimi K2's templates append/pop on their own lists; inputs are copies, so that is harmless.
    template = ChatTemplate("{% set ns = namespace(q=[]) %}{% set _ = ns.q.append(1) %}"
                            "{% set _ = messages.pop() %}{{ ns.q | length }}{{ messages | length }}")
    messages = [dict(m) for m in CONVERSATION[1:]]
    assert template.render(messages) == "12"
    assert messages == CONVERSATION[1:]


@pytest.mark.parametrize("source,match", [
    ("{{ 'a' * 100000000 }}", "too large"), ("{{ [1] * 100000000 }}", "too large"),
    ("{{ 10 ** 100000000 }}", "too large"), ("{% for i in range(10**9) %}{% endfor %}", "MAX_RANGE"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{" + "(" * 5000 + "1" + ")" * 5000 + "}}", "RecursionError"),
])
def test_resource_bombs_are_refused(source, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(source).render([])


def test_mutated_templates_fail_only_with_chat_template_error(templates_dir: Path):
    import random

    rng = random.Random(1234)
    sources = [_read(templates_dir, n) for n in ("Qwen-Qwen2.5-7B-Instruct.jinja",
                                                  "google-gemma-2-2b-it.jinja",
                                                  "microsoft-Phi-3.5-mini-instruct.jinja")]
    failures = 0
    for _ in range(150):
        s = rng.choice(sources)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(s))
            s = s[:i] + rng.choice(["", "{%", "}}", "(", "'", "|", "{{ x.y() }}", "%}", "]"]) + \
                s[i + rng.randint(0, 20):]
        try:
            ChatTemplate(s).render(CONVERSATION)
        except ChatTemplateError as e:
            failures += 1
            assert "\n" not in str(e)
    assert failures > 30  # the mutations do break templates; each break is a clean error


def test_raise_exception_message():
    template = ChatTemplate("{% if messages[0].role == 'user' %}"
                            "{{ raise_exception('Conversation must start with assistant') }}"
                            "{% endif %}")
    with pytest.raises(ChatTemplateError, match="raised an exception: Conversation must start with assistant$"):
        template.render(CONVERSATION)


def test_syntax_error_at_construction_names_line():
    with pytest.raises(ChatTemplateError, match=r"compilation failed.*line 2"):
        ChatTemplate("ok\n{% for %}")


def test_undefined_use_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="'nothing' is undefined"):
        ChatTemplate("{{ nothing.attr }}").render([])


# -- HF conventions --------------------------------------------------------------------------
def test_tojson_hf_behaviour():
    t = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}")
    out = t.render([], x={"b": "é<", "a": [1, None, True]})
    assert out == ('{"b": "é<", "a": [1, null, true]}|'
                   '{\n  "b": "é<",\n  "a": [\n    1,\n    null,\n    true\n  ]\n}')


def test_loop_controls_and_trim_lstrip_blocks():
    source = ("{% for m in messages %}\n"
              "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
              "{{ m.role }}\n"
              "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
              "{% endfor %}\n")
    assert ChatTemplate(source).render(CONVERSATION) == "user\nassistant\nuser\n"


def test_context_variables_and_python_string_methods():
    source = ("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is defined }}"
              "|{{ '  Ab c '.strip().lower().split(' ') }}|{{ 'xy'.startswith('x') }}"
              "|{{ {'k': 1}.get('k') }}|{% for k, v in {'a': 2}.items() %}{{ k }}{{ v }}{% endfor %}"
              "|{{ strftime_now('%Y') | length }}|{{ extra_flag }}")
    out = ChatTemplate(source, "<s>", "</s>").render([], add_generation_prompt=False, extra_flag=7)
    assert out == "<s>|</s>|False|False|['ab', 'c']|True|1|a2|4|7"


def test_items_filter_namespace_and_builtin_filters():
    source = ("{% set ns = namespace(n=0) %}{% for k, v in d | items %}{% set ns.n = ns.n + v %}"
              "{{ k }}{% endfor %}={{ ns.n }}|{{ d | dictsort | first | first }}|{{ 'a,b'.split(',')"
              " | join('+') }}|{{ [3, 1] | sort | list }}|{{ 'x' | upper }}")
    assert ChatTemplate(source).render([], d={"b": 2, "a": 1}) == "ba=3|a|a+b|[1, 3]|X"


def test_generation_tag_renders_body():
    source = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert ChatTemplate(source).render(CONVERSATION[1:2]) == "What is 2+2?"


def test_typed_content_joined_for_string_templates():
    parts = [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "second"}]
    t = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert t.render([{"role": "user", "content": parts}]) == "[first\nsecond]"


def test_typed_content_kept_for_templates_that_iterate_parts():
    # Like MiniMax-Text-01: only renders content given as typed parts.
    source = ("{% for m in messages %}{% for p in m.content %}{% if p.type == 'text' %}"
              "<{{ p.text }}>{% endif %}{% endfor %}{% endfor %}")
    t = ChatTemplate(source)
    assert t.caps.requires_typed_content
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert t.render([{"role": "user", "content": parts}]) == "<a><b>"
    assert t.render([{"role": "user", "content": "plain"}]) == "<plain>"


def test_system_role_polyfill_for_gemma2(templates_dir: Path):
    t = ChatTemplate(_read(templates_dir, "google-gemma-2-2b-it.jinja"), "<bos>", "<eos>")
    assert not t.caps.supports_system_role
    assert t.render(CONVERSATION) == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 4.<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_tools_polyfill_for_template_without_tools():
    t = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tool = {"type": "function", "function": {"name": "lookup"}}
    out = t.render([{"role": "user", "content": "hi"}], tools=[tool])
    assert out.startswith("system: You can call any of the following tools to satisfy the "
                          "user's requests: [\n  {\n    \"type\": \"function\"")
    assert out.endswith("user: hi\n")


# -- choosing the template for a model -------------------------------------------------------
class _FakeTokenizer:
    bos_id, eos_id, add_bos, add_eos = 1, 2, True, False

    def token_text(self, token_id: int) -> str:
        return {1: "<bos>", 2: "<eos>"}[token_id]


def test_for_model_prefers_override_then_model_then_chatml():
    meta = {"tokenizer.chat_template": "{{ bos_token }}MODEL{{ messages | length }}"}
    tok = _FakeTokenizer()
    # The model's template; the tokenizer adds BOS itself, so the rendered BOS text is dropped.
    assert ChatTemplate.for_model(meta, tok).render(CONVERSATION[1:]) == "MODEL3"
    assert ChatTemplate.for_model(meta, tok, name="llama3").name == "llama3"
    assert ChatTemplate.for_model(meta, tok, source="SRC").render([]) == "SRC"
    assert ChatTemplate.for_model(meta, tok, name="{{ 'inline' }}").render([]) == "inline"
    fallback = ChatTemplate.for_model({}, tok)
    assert fallback.name == "chatml"
    assert fallback.render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ChatTemplateError, match="unknown chat template 'nope'.*chatml"):
        ChatTemplate.for_model(meta, tok, name="nope")


def test_for_model_uses_tool_use_variant_only_with_tools():
    meta = {"tokenizer.chat_template": "plain", "tokenizer.chat_template.tool_use": "tools:"
            "{{ tools | length }}"}
    t = ChatTemplate.for_model(meta, None)
    assert t.render(CONVERSATION) == "plain"
    assert t.render(CONVERSATION, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools:1"


# -- built-ins: exactly what llama.cpp's C++ formatter writes --------------------------------
CHAT = [
    {"role": "system", "content": "Sys"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Yo "},
    {"role": "user", "content": "More"},
]
BUILTIN_EXPECTED = {
    "chatml": "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\n Yo <|im_end|>\n<|im_start|>user\nMore<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama2": "[INST] Sys\nHi [/INST] Yo </s>[INST] More [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Yo </s>[INST] More [/INST]",
    "llama2-sys-bos": "[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] More [/INST]",
    "llama2-sys-strip": "[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST]Yo</s>[INST] More [/INST]",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nMore<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-v7": "[SYSTEM_PROMPT] Sys[/SYSTEM_PROMPT][INST] Hi[/INST]  Yo </s>[INST] More[/INST]",
    "mistral-v7-tekken": "[SYSTEM_PROMPT]Sys[/SYSTEM_PROMPT][INST]Hi[/INST] Yo </s>[INST]More[/INST]",
    "mistral-v1": " [INST] Sys\n\nHi [/INST]  Yo </s> [INST] More [/INST]",
    "mistral-v3": "[INST] Sys\n\nHi[/INST] Yo</s>[INST] More[/INST]",
    "mistral-v3-tekken": "[INST]Sys\n\nHi[/INST] Yo </s>[INST]More[/INST]",
    "gemma": "<start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
             "<start_of_turn>user\nMore<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nSys<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n Yo <|end|>\n"
            "<|user|>\nMore<|end|>\n<|assistant|>\n",
    "zephyr": "<|system|>\nSys<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\n Yo "
              "<|endoftext|>\n<|user|>\nMore<|endoftext|>\n<|assistant|>\n",
    "deepseek": "Sys### Instruction:\nHi\n### Response:\n Yo \n<|EOT|>\n### Instruction:\nMore\n"
                "### Response:\n",
    "deepseek3": "Sys\n\n<｜User｜>Hi<｜Assistant｜> Yo <｜end▁of▁sentence｜><｜User｜>More<｜Assistant｜>",
    "vicuna": "Sys\n\nUSER: Hi\nASSISTANT:  Yo </s>\nUSER: More\nASSISTANT:",
    "vicuna-orca": "SYSTEM: Sys\nUSER: Hi\nASSISTANT:  Yo </s>\nUSER: More\nASSISTANT:",
    "command-r": "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Sys<|END_OF_TURN_TOKEN|>"
                 "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
                 "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Yo<|END_OF_TURN_TOKEN|>"
                 "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>More<|END_OF_TURN_TOKEN|>"
                 "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "granite": "<|start_of_role|>system<|end_of_role|>Sys<|end_of_text|>\n"
               "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n"
               "<|start_of_role|>assistant<|end_of_role|> Yo <|end_of_text|>\n"
               "<|start_of_role|>user<|end_of_role|>More<|end_of_text|>\n"
               "<|start_of_role|>assistant<|end_of_role|>",
    "openchat": "Sys<|end_of_turn|>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant:  Yo "
                "<|end_of_turn|>GPT4 Correct User: More<|end_of_turn|>GPT4 Correct Assistant:",
    "rwkv-world": "System: Sys\n\nUser: Hi\n\nAssistant: Yo\n\nUser: More\n\nAssistant:",
    "monarch": "system\nSys</s>\n<s>user\nHi</s>\n<s>assistant\n Yo </s>\n<s>user\nMore</s>\n"
               "<s>assistant\n",
    "orion": "Human: Sys\n\nHi\n\nAssistant: </s> Yo </s>Human: More\n\nAssistant: </s>",
    "gigachat": "<s>Sys<|message_sep|>user<|role_sep|>Hi<|message_sep|>available functions<|role_sep|>"
                "[]<|message_sep|>assistant<|role_sep|> Yo <|message_sep|>user<|role_sep|>More"
                "<|message_sep|>available functions<|role_sep|>[]<|message_sep|>assistant<|role_sep|>",
    "phi4": "<|im_start|>system<|im_sep|>Sys<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
            "<|im_start|>assistant<|im_sep|> Yo <|im_end|><|im_start|>user<|im_sep|>More<|im_end|>"
            "<|im_start|>assistant<|im_sep|>",
    "chatglm4": "[gMASK]<sop><|system|>\nSys<|user|>\nHi<|assistant|>\n Yo <|user|>\nMore<|assistant|>\n",
    "exaone3": "[|system|]Sys[|endofturn|]\n[|user|]Hi\n[|assistant|]Yo[|endofturn|]\n[|user|]More\n"
               "[|assistant|]",
    "bailing": "<role>SYSTEM</role>Sys<role>HUMAN</role>Hi<role>ASSISTANT</role> Yo "
               "<role>HUMAN</role>More<role>ASSISTANT</role>",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_EXPECTED))
def test_builtin_matches_llama_cpp(name):
    assert ChatTemplate.builtin(name).render(CHAT) == BUILTIN_EXPECTED[name]


def test_builtin_generation_prompt_switch():
    assert ChatTemplate.builtin("chatml").render(CHAT[:2], add_generation_prompt=False) == (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    # llama.cpp's llama2 formatter never adds an assistant prefix.
    assert ChatTemplate.builtin("llama2").render(CHAT[:2], add_generation_prompt=False) == \
        ChatTemplate.builtin("llama2").render(CHAT[:2])


def test_builtin_trim_is_ascii_whitespace_only():
    # C++ trim() strips isspace() characters only; a no-break space stays.
    msgs = [{"role": "user", "content": "\u00a0x\t\n"}]
    assert ChatTemplate.builtin("llama3").render(msgs, add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\n\u00a0x<|eot_id|>")


def test_builtin_names_and_aliases():
    for name in ("chatml", "llama2", "llama3", "mistral", "mistral-v3", "mistral-v7", "gemma",
                 "phi3", "zephyr", "deepseek", "deepseek3", "vicuna", "command-r", "granite"):
        assert name in BUILTIN_TEMPLATES
    assert ChatTemplate.builtin("mistral").render(CHAT) == BUILTIN_EXPECTED["mistral-v7"]
    with pytest.raises(ChatTemplateError, match="unknown chat template"):
        ChatTemplate.builtin("no-such-template")


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_every_builtin_renders_typed_and_null_content(name):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": None}]
    assert "Q" in ChatTemplate.builtin(name).render(msgs)


# -- tool conversations (llama.cpp's message normalisation + polyfills) ----------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "a1b2C3d4E", "type": "function",  # 9 alphanumerics: Mistral templates insist
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "a1b2C3d4E", "name": "get_weather", "content": "sunny 21C"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("path", _template_files(), ids=lambda p: p.stem)
def test_real_template_renders_tool_conversation(path: Path):
    template = ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
    prompt = template.render([CONVERSATION[0], *TOOL_CHAT], tools=[WEATHER_TOOL])
    for needle in ("Paris", "sunny 21C", "It is sunny.", "Thanks", "get_weather"):
        assert needle in prompt, (path.name, needle)


def test_tool_call_and_response_polyfills_for_gemma2(templates_dir: Path):
    t = ChatTemplate(_read(templates_dir, "google-gemma-2-2b-it.jinja"), "<bos>", "<eos>")
    assert not t.caps.supports_tool_calls and not t.caps.supports_tool_responses
    prompt = t.render(TOOL_CHAT[:4], add_generation_prompt=False)
    assert prompt == (
        "<bos><start_of_turn>user\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n"
        '{\n  "tool_calls": [\n    {\n      "name": "get_weather",\n      "arguments": {\n'
        '        "city": "Paris"\n      },\n      "id": "a1b2C3d4E"\n    }\n  ]\n}<end_of_turn>\n'
        '<start_of_turn>user\n{\n  "tool_response": {\n    "tool": "get_weather",\n'
        '    "content": "sunny 21C",\n    "tool_call_id": "a1b2C3d4E"\n  }\n}<end_of_turn>\n'
        "<start_of_turn>model\nIt is sunny.<end_of_turn>\n")


def test_object_arguments_for_templates_that_need_them(templates_dir: Path):
    llama31 = ChatTemplate(_read(templates_dir, "meta-llama-Llama-3.1-8B-Instruct.jinja"))
    assert llama31.caps.requires_object_arguments
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n'
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
            in llama31.render(TOOL_CHAT[:3]))
    qwen = ChatTemplate(_read(templates_dir, "Qwen-Qwen2.5-7B-Instruct.jinja"))
    # content null is rendered as "" (as llama-server passes it), so no stray "None".
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
            'sunny 21C\n</tool_response><|im_end|>\n' in qwen.render(TOOL_CHAT[:3]))


def test_object_arguments_from_client_are_serialised_compactly():
    t = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}"
                     "{{ c.function.arguments }}{% endfor %}{% endfor %}")
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{
        "type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": "é"}}}]}]
    assert t.render(msgs, add_generation_prompt=False) == '{"a":1,"b":"é"}'


def test_tojson_accepts_jinja_generators():
    t = ChatTemplate("{{ tools | map(attribute='function') | map(attribute='name') | tojson }}")
    assert t.render([], tools=[WEATHER_TOOL]) == '["get_weather"]'


# -- llama.cpp's own vectors (tests/test-chat-template.cpp): one conversation, expected text ---
LLAMA_CPP_CHAT = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
_AM = "   I am an assistant   "
# Built-in name -> what llama.cpp's C++ formatter produces for LLAMA_CPP_CHAT (+ generation prompt).
LLAMA_CPP_BUILTIN_EXPECTED = {
    "chatml": ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello"
               "<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you"
               f"<|im_end|>\n<|im_start|>assistant\n{_AM}<|im_end|>\n<|im_start|>user\n"
               "Another question<|im_end|>\n<|im_start|>assistant\n"),
    "llama2": (f"[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you "
               f"[/INST]{_AM}</s>[INST] Another question [/INST]"),
    "llama2-sys-bos": ("[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there"
                       f"</s><s>[INST] Who are you [/INST]{_AM}</s><s>[INST] Another question [/INST]"),
    "llama2-sys-strip": ("[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi "
                         "there</s>[INST] Who are you [/INST]I am an assistant</s>[INST] Another "
                         "question [/INST]"),
    "monarch": ("system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi there"
                f"</s>\n<s>user\nWho are you</s>\n<s>assistant\n{_AM}</s>\n<s>user\nAnother question"
                "</s>\n<s>assistant\n"),
    "gemma": ("<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>"
              "model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n"
              "<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\nAnother "
              "question<end_of_turn>\n<start_of_turn>model\n"),
    "orion": ("Human: You are a helpful assistant\n\nHello\n\nAssistant: </s>Hi there</s>Human: Who "
              f"are you\n\nAssistant: </s>{_AM}</s>Human: Another question\n\nAssistant: </s>"),
    "openchat": ("You are a helpful assistant<|end_of_turn|>GPT4 Correct User: Hello<|end_of_turn|>"
                 "GPT4 Correct Assistant: Hi there<|end_of_turn|>GPT4 Correct User: Who are you"
                 f"<|end_of_turn|>GPT4 Correct Assistant: {_AM}<|end_of_turn|>GPT4 Correct User: "
                 "Another question<|end_of_turn|>GPT4 Correct Assistant:"),
    "deepseek": ("You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n"
                 f"<|EOT|>\n### Instruction:\nWho are you\n### Response:\n{_AM}\n<|EOT|>\n"
                 "### Instruction:\nAnother question\n### Response:\n"),
    "vicuna": ("You are a helpful assistant\n\nUSER: Hello\nASSISTANT: Hi there</s>\nUSER: Who are "
               f"you\nASSISTANT: {_AM}</s>\nUSER: Another question\nASSISTANT:"),
    "vicuna-orca": ("SYSTEM: You are a helpful assistant\nUSER: Hello\nASSISTANT: Hi there</s>\n"
                    f"USER: Who are you\nASSISTANT: {_AM}</s>\nUSER: Another question\nASSISTANT:"),
    "command-r": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant"
                  "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who are you<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>I am an assistant<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Another question<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>"
               "assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n"),
    "phi3": ("<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
             f"Hi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n{_AM}<|end|>\n<|user|>\n"
             "Another question<|end|>\n<|assistant|>\n"),
    "chatglm3": ("[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n "
                 f"Hi there<|user|>\n Who are you<|assistant|>\n {_AM}<|user|>\n Another question"
                 "<|assistant|>"),
    "chatglm4": ("[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\n"
                 f"Hi there<|user|>\nWho are you<|assistant|>\n{_AM}<|user|>\nAnother question"
                 "<|assistant|>\n"),
    "glmedge": ("<|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there"
                f"<|user|>\nWho are you<|assistant|>\n{_AM}<|user|>\nAnother question<|assistant|>"),
    "minicpm": ("You are a helpful assistant<用户>Hello<AI>Hi there<用户>Who are you<AI>I am an "
                "assistant<用户>Another question<AI>"),
    "deepseek2": ("You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi there<｜end▁of▁sentence｜>"
                  f"User: Who are you\n\nAssistant: {_AM}<｜end▁of▁sentence｜>User: Another question"
                  "\n\nAssistant:"),
    "granite": ("<|start_of_role|>system<|end_of_role|>You are a helpful assistant<|end_of_text|>\n"
                "<|start_of_role|>user<|end_of_role|>Hello<|end_of_text|>\n<|start_of_role|>assistant"
                "<|end_of_role|>Hi there<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Who are "
                f"you<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>{_AM}<|end_of_text|>\n"
                "<|start_of_role|>user<|end_of_role|>Another question<|end_of_text|>\n"
                "<|start_of_role|>assistant<|end_of_role|>"),
    "mistral-v1": (" [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are "
                   f"you [/INST] {_AM}</s> [INST] Another question [/INST]"),
    "mistral-v3": ("[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you"
                   "[/INST] I am an assistant</s>[INST] Another question[/INST]"),
    "mistral-v3-tekken": ("[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are "
                          f"you[/INST]{_AM}</s>[INST]Another question[/INST]"),
    "mistral-v7": ("[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi "
                   f"there</s>[INST] Who are you[/INST] {_AM}</s>[INST] Another question[/INST]"),
    "gigachat": ("<s>You are a helpful assistant<|message_sep|>user<|role_sep|>Hello<|message_sep|>"
                 "available functions<|role_sep|>[]<|message_sep|>assistant<|role_sep|>Hi there"
                 "<|message_sep|>user<|role_sep|>Who are you<|message_sep|>available functions"
                 f"<|role_sep|>[]<|message_sep|>assistant<|role_sep|>{_AM}<|message_sep|>user"
                 "<|role_sep|>Another question<|message_sep|>available functions<|role_sep|>[]"
                 "<|message_sep|>assistant<|role_sep|>"),
    "megrez": ("<|role_start|>system<|role_end|>You are a helpful assistant<|turn_end|><|role_start|>"
               "user<|role_end|>Hello<|turn_end|><|role_start|>assistant<|role_end|>Hi there"
               "<|turn_end|><|role_start|>user<|role_end|>Who are you<|turn_end|><|role_start|>"
               f"assistant<|role_end|>{_AM}<|turn_end|><|role_start|>user<|role_end|>Another "
               "question<|turn_end|><|role_start|>assistant<|role_end|>"),
    "phi4": ("<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user"
             "<|im_sep|>Hello<|im_end|><|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|>"
             f"user<|im_sep|>Who are you<|im_end|><|im_start|>assistant<|im_sep|>{_AM}<|im_end|>"
             "<|im_start|>user<|im_sep|>Another question<|im_end|><|im_start|>assistant<|im_sep|>"),
    "bailing": ("<role>SYSTEM</role>You are a helpful assistant<role>HUMAN</role>Hello<role>ASSISTANT"
                "</role>Hi there<role>HUMAN</role>Who are you<role>ASSISTANT</role>"
                f"{_AM}<role>HUMAN</role>Another question<role>ASSISTANT</role>"),
}
_TOOL_TURNS = [{"role": "user", "content": "What is the weather?"},
               {"role": "assistant_tool_call",
                "content": '<tool_call>\n{"name": "get_weather", "arguments": {"location": "NYC"}}'
                           '\n</tool_call>'},
               {"role": "tool_response", "content": '{"temperature": 72}'}]


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_BUILTIN_EXPECTED))
def test_builtin_matches_llama_cpp_test_vectors(name):
    assert ChatTemplate.builtin(name).render(LLAMA_CPP_CHAT) == LLAMA_CPP_BUILTIN_EXPECTED[name]


@pytest.mark.parametrize("name", ["granite-4.0", "granite-4.1"])
def test_granite4_tool_call_turns(name):
    expected = (LLAMA_CPP_BUILTIN_EXPECTED["granite"].removesuffix(
        "<|start_of_role|>assistant<|end_of_role|>")
        + "<|start_of_role|>user<|end_of_role|>What is the weather?<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|><|tool_call|><tool_call>\n{\"name\": "
        "\"get_weather\", \"arguments\": {\"location\": \"NYC\"}}\n</tool_call><|end_of_text|>\n"
        "<|start_of_role|>tool_response<|end_of_role|>{\"temperature\": 72}<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>")
    assert ChatTemplate.builtin(name).render(LLAMA_CPP_CHAT + _TOOL_TURNS) == expected


# Real templates rendered by llama.cpp's Jinja path (with its polyfills), bos "<s>"/eos "</s>"
# unless noted: (template, bos, eos, expected).
LLAMA_CPP_JINJA_CASES = {
    "mistral-v0.2-no-system": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}", "", "</s>",
        f"[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]"
        f"{_AM}</s>[INST] Another question [/INST]"),
    "gemma-7b-it": (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % "
        "2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/"
        "assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
        "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
        "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\\n'}}{% endif %}", "", "",
        "<start_of_turn>user\nYou are a helpful assistant\nHello<end_of_turn>\n<start_of_turn>model\n"
        "Hi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\n"
        "I am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n"
        "<start_of_turn>model\n"),
    "alpha-monarch": (
        "{% for message in messages %}{{bos_token + message['role'] + '\\n' + message['content'] + "
        "eos_token + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}"
        "{% endif %}", "<s>", "</s>",
        "<s>system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi there</s>\n"
        f"<s>user\nWho are you</s>\n<s>assistant\n{_AM}</s>\n<s>user\nAnother question</s>\n"
        "<s>assistant\n"),
    "openchat-3.5": (
        "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + "
        "': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ 'GPT4 Correct Assistant:' }}{% endif %}", "", "",
        "GPT4 Correct System: You are a helpful assistant<|end_of_turn|>GPT4 Correct User: Hello"
        "<|end_of_turn|>GPT4 Correct Assistant: Hi there<|end_of_turn|>GPT4 Correct User: Who are you"
        f"<|end_of_turn|>GPT4 Correct Assistant: {_AM}<|end_of_turn|>GPT4 Correct User: Another "
        "question<|end_of_turn|>GPT4 Correct Assistant:"),
    "phi-3-mini": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
        "{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}"
        "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\\n'}}"
        "{% endif %}{% endfor %}", "", "",
        "<|user|>\nYou are a helpful assistant\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>"
        f"\nWho are you<|end|>\n<|assistant|>\n{_AM}<|end|>\n<|user|>\nAnother question<|end|>\n"
        "<|assistant|>\n"),
    "seed-oss": (
        "{# <seed:bos> #}{%- for message in messages %}{%- if message.role in [\"user\", \"system\"] %}"
        "{{ bos_token + message.role + \"\\n\" + message.content + eos_token }}{%- elif message.role == "
        "\"assistant\" %}{{ bos_token + message.role }}{%- if message.content is defined and "
        "message.content is string and message.content|trim|length > 0 %}{{ \"\\n\" + "
        "message.content|trim + eos_token }}{%- endif %}{%- else %}{{ bos_token + message.role + "
        "\"\\n\" + message.content + eos_token }}{%- endif %}{%- endfor %}{%- if "
        "add_generation_prompt %}{{ bos_token + \"assistant\\n\" }}{%- endif %}",
        "<seed:bos>", "<seed:eos>",
        "<seed:bos>system\nYou are a helpful assistant<seed:eos><seed:bos>user\nHello<seed:eos>"
        "<seed:bos>assistant\nHi there<seed:eos><seed:bos>user\nWho are you<seed:eos><seed:bos>"
        "assistant\nI am an assistant<seed:eos><seed:bos>user\nAnother question<seed:eos><seed:bos>"
        "assistant\n"),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CPP_JINJA_CASES))
def test_jinja_matches_llama_cpp_test_vectors(case):
    source, bos, eos, expected = LLAMA_CPP_JINJA_CASES[case]
    assert ChatTemplate(source, bos, eos).render(LLAMA_CPP_CHAT) == expected


def test_for_model_falls_back_to_chatml_when_model_template_is_broken():
    t = ChatTemplate.for_model({"tokenizer.chat_template": "{% for m in messages %}"}, None)
    assert t.name == "chatml" and "unusable" in t.warning and "compilation failed" in t.warning
    assert t.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")
    # An explicit override is the user's choice: errors are reported, not replaced.
    with pytest.raises(ChatTemplateError, match="compilation failed"):
        ChatTemplate.for_model({}, None, source="{% for m in messages %}")
