"""The `ggserve` command line: `serve` (llama-server's flags, env vars, TOML config), and the
`generate`, `tokenize` and `info` sub-commands. `server/__main__.py` dispatches to them.
"""
