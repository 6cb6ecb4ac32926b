"""Chat: everything between an OpenAI `messages` list and a prompt, and back.

Owns the Jinja chat templates (`template.py`; `sandbox.py` bounds a render's time and memory, with
`sizes.py`'s estimates; `polyfills.py` prepares messages the way llama.cpp does;
`builtin_templates.py` has the named fallbacks), prompts -> token ids
(`prompts.py`), and tool calls: validating `tools` / `tool_choice` (`tool_choice.py`) and
parsing calls out of the model's reply (`tool_calls.py`, on `json_scan.py`).
"""
