"""Where llama.cpp's reference data lives: ../shared/testdata, or GGSERVE_TESTDATA."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_data_dir() -> Path:
    return Path(os.environ.get("GGSERVE_TESTDATA") or REPO_ROOT.parent / "shared" / "testdata")
