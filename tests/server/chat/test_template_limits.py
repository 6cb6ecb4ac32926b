"""Chat-template limits: a hostile template fails fast with one clear ChatTemplateError instead of
filling memory or spinning a thread; real templates still render, and check() says at start-up
whether a template can render at all."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import jinja2.ext
import pytest
from jinja2.sandbox import SandboxedEnvironment

from ggserve.server.chat.template import ChatTemplate, ChatTemplateError, TemplateLimits
from tests.server.chat.test_template import CONVERSATION, _template_files

HANG = 60.0  # seconds: long enough for a loaded 2-core CI machine, short enough to catch a hang
MAX_GROWTH_MIB = 200
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"




def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_growth_mib(fn) -> float:
    """Run fn; how far the process's peak RSS rose above its RSS before (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pytest.skip("measuring peak memory needs /proc/self/clear_refs (Linux)")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _render_error(source: str, limits: TemplateLimits = TemplateLimits(), **context) -> str:
    """The one-line error rendering `source` ends with, well before HANG."""
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source, limits=limits).render([], **context)
    assert time.monotonic() - start < HANG
    message = str(info.value)
    assert "\n" not in message and "ggserve" not in message and "sandbox.py" not in message
    return message


# -- memory ----------------------------------------------------------------------------------
GROWTH_BOMBS = {
    "concat doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "plus doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "repetition doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                           "{% set ns.s = ns.s * 2 %}{% endfor %}",
    "one huge repetition": "{{ 'x' * 1000000000000 }}",
    "list repetition": "{{ [[1, 2, 3]] * 1000000000 }}",
    "join filter": "{{ range(100000) | map('string') | join('x' * 1000) }}",
    "join filter squaring": "{% set ns = namespace(s='ab') %}{% for i in range(8) %}"
                            "{% set ns.s = ns.s | join(ns.s) %}{% endfor %}",
    "str.join": "{{ ('x' * 1000).join(range(100000) | map('string')) }}",
    "replace doubling": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
                        "{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "center": "{{ 'x' | center(999999999) }}",
    "indent": "{{ ('x\\n' * 100000) | indent(100000) }}",
    "tojson indent": "{% set ns = namespace(x=1) %}{% for i in range(300) %}{% set ns.x = [ns.x] %}"
                     "{% endfor %}{{ ns.x | tojson(indent=100000) }}",
    "integer squaring": "{% set ns = namespace(n=3) %}{% for i in range(60) %}"
                        "{% set ns.n = ns.n * ns.n %}{% endfor %}",
}


@pytest.mark.parametrize("source", GROWTH_BOMBS.values(), ids=GROWTH_BOMBS.keys())
def test_growth_is_refused_before_it_fills_memory(source):
    errors = []
    growth = _peak_growth_mib(lambda: errors.append(_render_error(source)))
    assert growth < MAX_GROWTH_MIB, errors
    assert "too large" in errors[0] and "limit" in errors[0], errors


def test_size_errors_say_what_and_how_much():
    message = _render_error("{{ 'ab' * 1000000 }}", TemplateLimits(max_output_bytes=1 << 20))
    assert message == ("the chat template's text is too large: `*` makes 1.9 MiB, over the "
                       "1 MiB limit (template line 1)")


def test_total_output_is_bounded():
    limits = TemplateLimits(max_output_bytes=4096)
    assert len(ChatTemplate("{{ 'x' * 4000 }}", limits=limits).render([])) == 4000
    loop = "{% for i in range(10) %}{{ 'x' * 1000 }}{% endfor %}"
    assert _render_error(loop, limits) == "the chat template's output exceeded 4 KiB"


def test_values_kept_in_a_loop_are_bounded():
    # Each string is under the size limit; keeping one per iteration must still stop.
    limits = TemplateLimits(max_output_bytes=1 << 20)
    kept_in_list = ("{% set ns = namespace(l=[]) %}{% set big = 'x' * 1000000 %}"
                    "{% for i in range(100000) %}{% set _ = ns.l.append(big ~ i) %}{% endfor %}")
    kept_in_block = ("{% set big = 'x' * 1000000 %}{% set out %}{% for i in range(100000) %}"
                     "{{ big ~ i }}{% endfor %}{% endset %}")
    for source in (kept_in_list, kept_in_block):
        errors = []
        growth = _peak_growth_mib(lambda: errors.append(_render_error(source, limits)))
        assert growth < MAX_GROWTH_MIB
        assert errors[0] == ("the chat template kept more than 16 MiB in one render "
                             "(template line 1)")


# -- time ------------------------------------------------------------------------------------
SPINNERS = {
    "nested range loops": SPIN,
    "filtered loop": "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}"
                     "{% endfor %}{% endfor %}",
    "macro recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                       "{% endmacro %}{{ f(60) }}",
    "select over a list": "{% set xs = range(100000) | list %}"
                          "{{ range(100000) | select('in', xs) | list | length }}",
}


@pytest.mark.parametrize("source", SPINNERS.values(), ids=SPINNERS.keys())
def test_long_render_stops_and_its_thread_ends(source):
    template = ChatTemplate(source, limits=TemplateLimits(max_render_seconds=1))
    errors: list = []

    def render():
        try:
            template.render(CONVERSATION)
        except ChatTemplateError as e:
            errors.append(str(e))

    worker = threading.Thread(target=render, name="template-render")
    start = time.monotonic()
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive() and worker not in threading.enumerate()
    assert time.monotonic() - start >= 0.9  # it ran until its limit, then stopped itself
    assert errors == ["rendering the chat template took longer than 1 s (template line 1)"]


def test_time_limit_is_per_render_and_per_thread():
    template = ChatTemplate("{% if spin %}" + SPIN + "{% endif %}ok",
                            limits=TemplateLimits(max_render_seconds=2))
    errors: list = []

    def spin():
        try:
            template.render(CONVERSATION, spin=True)
        except ChatTemplateError as e:
            errors.append(str(e))

    spinner = threading.Thread(target=spin)
    spinner.start()
    for _ in range(3):  # meanwhile, renders in this thread are unaffected
        assert template.render(CONVERSATION, spin=False) == "ok"
    spinner.join(HANG)
    assert not spinner.is_alive() and "took longer than 2 s" in errors[0]
    assert template.render(CONVERSATION, spin=False) == "ok"  # and after it


# -- the limits ------------------------------------------------------------------------------
def test_limits_defaults_and_validation():
    limits = TemplateLimits()
    assert (limits.max_render_seconds, limits.max_output_bytes) == (10.0, 8 << 20)
    assert limits.max_held_bytes == 128 << 20 and limits.max_items == 1 << 20
    assert TemplateLimits(max_output_bytes=1 << 20).max_held_bytes == 16 << 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_render_seconds = 1  # type: ignore[misc]
    for bad in ({"max_render_seconds": 0}, {"max_render_seconds": -1},
                {"max_render_seconds": float("inf")}, {"max_render_seconds": float("nan")},
                {"max_render_seconds": "5"}, {"max_render_seconds": True},
                {"max_output_bytes": 100}, {"max_output_bytes": 1.5e6},
                {"max_held_bytes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TemplateLimits(**bad)
    with pytest.raises(TypeError, match="TemplateLimits"):
        ChatTemplate("x", limits=5)  # type: ignore[arg-type]


def test_for_model_passes_limits_to_every_template_it_makes():
    limits = TemplateLimits(max_render_seconds=3, max_output_bytes=1 << 20)
    meta = {"tokenizer.chat_template": "plain", "tokenizer.chat_template.tool_use": "tools"}
    template = ChatTemplate.for_model(meta, limits=limits)
    assert template.limits is limits and template.tool_use.limits is limits
    assert ChatTemplate.for_model({}, limits=limits).limits is limits  # chatml
    assert ChatTemplate.for_model(meta, name="llama3", limits=limits).limits is limits
    broken = ChatTemplate.for_model({"tokenizer.chat_template": "{% for %}"}, limits=limits)
    assert broken.name == "chatml" and broken.limits is limits


# -- what still works ------------------------------------------------------------------------
SEMANTICS = [  # the sandbox's hooks (loops, `~`, literals, operators) must not change output
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ loop.cycle('a', 'b') }}"
    "{% if loop.last %}!{% endif %}{% if loop.changed(m.role) %}*{% endif %}{% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ m.content }}{% else %}none{% endfor %}",
    "{% for x in tree recursive %}[{{ x.n }}{% if x.c %}{{ loop(x.c) }}{% endif %}]{% endfor %}",
    "{{ 1 ~ none ~ 'a' ~ [1, 'b'] ~ {'k': (1, 2)} }}|{{ [1] + [2] }}|{{ 'ab' * 3 }}|{{ 7 // 2 }}",
    "{{ '%s-%05.1f' % ('a', 2.5) }}|{{ '{}:{:>4}'.format('k', 3) }}|{{ 'a,b'.split(',') }}",
    "{{ [3, 1, 2] | sort | join(',') }}|{{ 'x' | center(5) }}|{{ 'a\nb' | indent(2) }}",
    "{% macro m(x) %}<{{ x }}{{ caller() }}>{% endmacro %}{% call m(1) %}c{% endcall %}"
    "{% set block %}{{ messages | length }}{% endset %}{{ block }}{{ -(3) }}{{ 2 ** 10 }}",
    "{% set ns = namespace(l=[]) %}{% for m in messages %}{% set _ = ns.l.append(m.role) %}"
    "{% endfor %}{{ ns.l | join('+') }}{{ ns.l | batch(3, '-') | list }}{{ ns.l[1:3] }}",
]


@pytest.mark.parametrize("source", SEMANTICS)
def test_sandbox_hooks_keep_jinja_semantics(source):
    plain = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[jinja2.ext.loopcontrols])
    tree = [{"n": 1, "c": [{"n": 2, "c": []}]}, {"n": 3, "c": []}]
    messages = CONVERSATION[1:]  # no system message: no polyfill rewrites the conversation
    expected = plain.from_string(source).render(messages=messages, tree=tree)
    assert ChatTemplate(source).render(messages, tree=tree) == expected


@pytest.mark.parametrize("path", _template_files(), ids=lambda p: p.stem)
def test_check_passes_on_real_templates(path: Path):
    source = path.read_text(encoding="utf-8")
    ChatTemplate(source, bos_token="<s>", eos_token="</s>").check()
    # ... also as a model's tool_use template, which check() renders with a tool.
    template = ChatTemplate.for_model({"tokenizer.chat_template": source,
                                       "tokenizer.chat_template.tool_use": source})
    template.check()
    assert template.tool_use is not None


@pytest.mark.parametrize("source,reason", [
    ("{{ raise_exception('Only user and assistant roles are supported') }}",
     "chat template raised an exception: Only user and assistant roles are supported"),
    ("{{ messages[0].content.nope() }}", "UndefinedError"),
    ("{% if messages %}" + SPIN + "{% endif %}", "took longer than 1 s"),
    ("{{ 'x' * 10**9 }}", "too large"),
])
def test_check_fails_with_one_line(source, reason):
    template = ChatTemplate(source, limits=TemplateLimits(max_render_seconds=1))
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        template.check()
    assert time.monotonic() - start < HANG
    message = str(info.value)
    assert message.startswith("the custom chat template cannot render a plain conversation: ")
    assert reason in message and "\n" not in message


def test_check_drops_a_tool_use_template_that_cannot_render(caplog):
    meta = {"tokenizer.chat_template": "{{ messages | length }}",
            "tokenizer.chat_template.tool_use": "{{ raise_exception('no tools here') }}"}
    template = ChatTemplate.for_model(meta)
    template.check()
    assert template.tool_use is None and "no tools here" in caplog.text
    assert template.render(CONVERSATION, tools=[{"type": "function"}]) == \
        template.render(CONVERSATION)


def test_errors_use_the_names_templates_know():
    for source, name in (("{{ 1 | tojson(nope=1) }}", "tojson()"),
                         ("{{ [1] | join(nope=1) }}", "join()"),
                         ("{{ raise_exception(1, 2) }}", "raise_exception()")):
        message = _render_error(source)
        assert name in message and "_tojson" not in message and "do_join" not in message
