"""Deployment files: the properties an operator relies on, checked without a Docker engine.

Owns: checks of `Dockerfile` (multi-stage, non-root, health check, exec-form entrypoint, what the
build copies vs `.dockerignore` and the packaged modules) and `docker-compose.yml` (hardening,
limits, thread settings, environment `ggserve` accepts, the `scale` profile), plus the image's
health-check probe run against a live HTTP server. deploy/nginx.conf: tests/deploy/test_nginx.py.
"""
from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from fnmatch import fnmatch

import pytest
from tests.testdata import REPO_ROOT as REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONTAINER_PORT = 8080


# ---- tiny parsers ------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) pairs; comments dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation are ignored by docker
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, value = full.partition(" ")
        instructions.append((keyword.upper(), value.strip()))
    return instructions


def stages(instructions) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def expand(value: str, env: dict[str, str]) -> str:
    """Docker/compose interpolation of `${VAR}` and `${VAR:-default}` (unset -> default)."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile):
    return stages(dockerfile)[-1]


@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def stage_env(stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, value in stage:
        if keyword in ("ARG", "ENV"):
            for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', value):
                env[m.group(1)] = expand(m.group(2).strip('"'), env)
    return env


def health_probe(healthcheck_cmd: list[str]) -> str:
    """The python -c source of an exec-form health check."""
    assert healthcheck_cmd[:2] == ["python", "-c"], healthcheck_cmd
    return healthcheck_cmd[2]


# ---- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_ships_only_the_venv(dockerfile, final_stage):
    froms = [v for k, v in dockerfile if k == "FROM"]
    assert len(froms) >= 2, "builder + runtime stages"
    assert froms[0].endswith(" AS builder")
    base = expand(froms[-1].split()[0], stage_env([i for i in dockerfile if i[0] == "ARG"][:1]))
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    copies = [v for k, v in final_stage if k == "COPY"]
    assert any(v.startswith("--from=builder") and "/opt/venv" in v for v in copies)
    assert not any(k == "RUN" and "pip install" in v for k, v in final_stage), "install in builder only"


def test_runtime_runs_as_an_unprivileged_numeric_user(final_stage):
    users = [v for k, v in final_stage if k == "USER"]
    assert users, "the runtime stage must switch user"
    uid = expand(users[-1], stage_env(final_stage)).split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER should be a numeric non-root uid, got {uid!r}"


def test_writable_dirs_are_owned_by_the_user_and_match_compose(final_stage, compose):
    env = stage_env(final_stage)
    setup = " ".join(v for k, v in final_stage if k == "RUN")
    for var in ("NUMBA_CACHE_DIR", "GGSERVE_CACHE"):
        path = env[var]
        assert path.startswith("/var/cache/ggserve/"), (var, path)
        assert path in setup, f"{path} must be created in the image"
        assert compose["services"]["ggserve"]["environment"][var] == path
    assert "chown -R ggserve:ggserve /var/cache/ggserve" in setup


def test_exec_form_entrypoint_cmd_port_and_stopsignal(final_stage):
    values = {k: v for k, v in final_stage}
    assert json.loads(values["ENTRYPOINT"]) == ["ggserve"]
    cmd = json.loads(values["CMD"])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == str(CONTAINER_PORT)
    assert values["EXPOSE"].split() == [str(CONTAINER_PORT)]
    assert values["STOPSIGNAL"] == "SIGTERM"
    env = stage_env(final_stage)  # `docker run IMAGE -m x.gguf` replaces CMD; env keeps the bind
    assert env["LLAMA_ARG_HOST"] == "0.0.0.0" and env["LLAMA_ARG_PORT"] == str(CONTAINER_PORT)


def test_healthcheck_probes_health_with_python(final_stage):
    value = dict(final_stage)["HEALTHCHECK"]
    options, _, command = value.partition(" CMD ")
    assert "--start-period=" in options, "model load + JIT need a grace period"
    source = health_probe(json.loads(command))
    assert f"http://127.0.0.1:{CONTAINER_PORT}/health" in source


def test_bake_default_model_build_arg(dockerfile):
    builder = stages(dockerfile)[0]
    assert stage_env(builder)["BAKE_DEFAULT_MODEL"] == "0", "baking is opt-in"
    runs = " ".join(v for k, v in builder if k == "RUN")
    assert '".[demo]"' in runs and "ensure_model" in runs


def test_build_copies_every_package_and_dockerignore_keeps_them(dockerfile):
    builder = stages(dockerfile)[0]
    sources = []
    for keyword, value in builder:
        if keyword == "COPY" and not value.startswith("--from"):
            sources += value.split()[:-1]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())  # server, engine, kernels, bench
    assert folders <= set(sources), f"COPY misses package folders: {folders - set(sources)}"
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"`docker build` would fail: {missing} not in the repository"
    ignored = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        hits = [p for p in ignored if fnmatch(source, p) or fnmatch(source, p.removeprefix("**/"))]
        assert not hits, f".dockerignore pattern {hits} excludes {source}, which the build copies"


def test_tiny_parser_agrees_with_dockerfile_parse(dockerfile):
    parser = pytest.importorskip("dockerfile_parse")
    theirs = [
        i["instruction"] for i in parser.DockerfileParser(str(REPO / "Dockerfile")).structure
        if i["instruction"] != "COMMENT"
    ]
    assert theirs == [k for k, _ in dockerfile]


@pytest.fixture()
def health_server():
    """A local HTTP server whose /health status the test sets."""
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_response(state["status"] if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], state
    server.shutdown()


def test_healthcheck_probe_exits_0_when_healthy_and_1_when_not(final_stage, health_server):
    port, state = health_server
    source = health_probe(json.loads(dict(final_stage)["HEALTHCHECK"].partition(" CMD ")[2]))
    source = source.replace(f"127.0.0.1:{CONTAINER_PORT}", f"127.0.0.1:{port}")
    run = lambda: subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=30)  # noqa: E731
    assert run().returncode == 0
    state["status"] = 503  # loading model: docker must see "unhealthy" (exit 1, never 2)
    assert run().returncode == 1


# ---- docker-compose.yml ----------------------------------------------------------------------


def test_compose_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"ggserve", "ggserve-replica", "lb"}
    assert "profiles" not in services["ggserve"], "`docker compose up` must start the server"
    assert services["ggserve-replica"]["profiles"] == ["scale"]
    assert services["lb"]["profiles"] == ["scale"]


@pytest.mark.parametrize("name", ["ggserve", "ggserve-replica", "lb"])
def test_every_service_is_hardened(compose, name):
    service = compose["services"][name]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    limits = service["deploy"]["resources"]["limits"]
    assert float(expand(str(limits["cpus"]), {})) > 0
    assert re.fullmatch(r"\d+[kmg]", expand(str(limits["memory"]), {}))
    assert service["healthcheck"]["test"][0] == "CMD"


@pytest.mark.parametrize("name", ["ggserve", "ggserve-replica"])
def test_server_containers_config(compose, name):
    service = compose["services"][name]
    env = {k: expand(str(v), {}) for k, v in service["environment"].items() if v is not None}
    threads = {env["OMP_NUM_THREADS"], env["NUMBA_NUM_THREADS"], env["LLAMA_ARG_THREADS"]}
    assert len(threads) == 1, "one thread count for every pool"
    cpus = float(expand(str(service["deploy"]["resources"]["limits"]["cpus"]), {}))
    assert int(threads.pop()) <= cpus, "more threads than CPUs only adds contention"
    assert env["LLAMA_ARG_PORT"] == str(CONTAINER_PORT) and env["LLAMA_ARG_HOST"] == "0.0.0.0"
    assert env["LLAMA_ARG_MODEL"].startswith("/models/")
    assert "LLAMA_API_KEY" not in env, "an empty key must not be passed when the shell has none"
    volumes = {v["target"]: v for v in service["volumes"]}
    assert volumes["/models"]["read_only"] is True
    writable = set(volumes) - {"/models"} | {t.split(":")[0] for t in service["tmpfs"]}
    assert env["NUMBA_CACHE_DIR"] in writable, "read-only root fs: the JIT cache needs a mount"
    assert f"127.0.0.1:{CONTAINER_PORT}/health" in health_probe(service["healthcheck"]["test"][1:])
    assert service["init"] is True and service["stop_grace_period"]


@pytest.mark.parametrize("name", ["ggserve", "ggserve-replica", "lb"])
def test_durations_are_compose_durations(compose, name):
    service = compose["services"][name]
    durations = {k: v for k, v in service["healthcheck"].items() if k != "test" and k != "retries"}
    if "stop_grace_period" in service:
        durations["stop_grace_period"] = service["stop_grace_period"]
    for key, value in durations.items():  # docker-compose 1.x does not check these
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", str(value)), f"{name}.{key}: {value!r}"


def test_compose_environment_is_accepted_by_ggserve(compose, final_stage):
    """The LLAMA_ARG_* names and values the containers get are ones `ggserve` understands."""
    cli = pytest.importorskip("ggserve.server.cli.serve")
    if not hasattr(cli, "resolve_settings"):
        pytest.skip("ggserve.server.cli.serve.resolve_settings not available")
    env = {k: expand(str(v), {}) for k, v in compose["services"]["ggserve"]["environment"].items() if v is not None}
    known = {name for opt in cli.OPTIONS for name in opt.env}
    llama_vars = {k for k in env if k.startswith("LLAMA_")}
    assert llama_vars <= known, f"ggserve ignores {llama_vars - known}"
    settings = cli.resolve_settings(json.loads(dict(final_stage)["CMD"]), environ={**env, "LLAMA_API_KEY": "k"})
    assert (settings.host, settings.port) == ("0.0.0.0", CONTAINER_PORT)
    assert settings.model_path == env["LLAMA_ARG_MODEL"] and settings.api_keys == ("k",)
    assert settings.threads == int(env["LLAMA_ARG_THREADS"]) and settings.endpoint_metrics is True
    assert settings.ctx_per_slot(32768) >= 1024, "each slot should fit a long prompt + answer"


def test_scale_profile_replicas_behind_lb(compose):
    services = compose["services"]
    replica, lb = services["ggserve-replica"], services["lb"]
    assert int(expand(str(replica["deploy"]["replicas"]), {})) >= 2
    assert "ports" not in replica, "replicas must not fight over a host port"
    assert lb["depends_on"]["ggserve-replica"]["condition"] == "service_healthy"
    mounts = {v["target"]: v for v in lb["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"]["source"] == "./deploy/nginx.conf"
    assert mounts["/etc/nginx/nginx.conf"]["read_only"] is True
    published = {expand(p, {}) for p in lb["ports"]} | {expand(p, {}) for p in services["ggserve"]["ports"]}
    assert len({p.split(":")[0] for p in published}) == 2, "lb and single server use different host ports"
