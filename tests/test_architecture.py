"""Architecture rules, checked on every test run (docs/architecture.md draws them).

- The import contracts in pyproject.toml ([tool.importlinter]) hold: which jaxturbo package may
  import which, pallas_kernels free of jaxturbo, nothing importing the CLI.
- Every jaxturbo package is named by some contract, so a new package states its dependencies.
- No module reaches into another package's private (underscore) names: `from a.b import _c`,
  `a.b._c`, `monkeypatch.setattr(a.b, "_c", ...)`.  A name another package needs is public.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("jaxturbo", "pallas_kernels", "experiments", "tests")

# Private names used across packages today, by file; each is to be made public (or the use
# removed) and then dropped from this list.  The test fails on any use not listed here,
# and on a listed one that is gone, so the list only shrinks.
KNOWN_PRIVATE_USES: dict[str, list[str]] = {
    "pallas_kernels/ragged_paged_attention/mosaic_tpu.py": [
        "pallas_kernels.decode_attention.mosaic_tpu._dot",
        "pallas_kernels.decode_attention.mosaic_tpu._interp",
    ],
    "pallas_kernels/ragged_paged_attention/pallas_triton.py": [
        "pallas_kernels.decode_attention.pallas_triton._TARGET_PROGRAMS",
    ],
    "tests/helpers/gguf_tiny.py": [
        "jaxturbo.bridge.gguf._permute_rows",
    ],
    "tests/pallas_kernels/test_cudnn_lse.py": [
        "jaxturbo.parallel.ring._merge",
        "pallas_kernels.flash_attention.cudnn_lse._CORE",
    ],
    "tests/pallas_kernels/test_mla_decode.py": [
        "pallas_kernels.decode_attention.pallas_triton._column_pieces",
    ],
    "tests/pallas_kernels/test_ragged_paged_attention.py": [
        "pallas_kernels.ragged_paged_attention.mosaic_tpu._FIELDS",
    ],
}


def test_import_contracts_hold():
    # in its own interpreter: import-linter sets up its own output (and would import the whole
    # graph into the test worker)
    lint = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, "
        "no_cache=True, no_logo=True))"
    )
    done = subprocess.run(
        [sys.executable, "-c", lint], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "0 broken" in report


def test_every_jaxturbo_package_is_under_a_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = set()
    for contract in config["contracts"]:
        named.update(contract.get("source_modules", []))
        for container in contract.get("containers", []):
            for layer in contract.get("layers", []):
                named.update(f"{container}.{m.strip()}" for m in layer.split("|"))
    packages = {
        f"jaxturbo.{p.name}" for p in (ROOT / "jaxturbo").iterdir() if (p / "__init__.py").is_file()
    }
    assert packages, "no jaxturbo packages found"
    missing = packages - named - {"jaxturbo.cli"}  # the CLI may import everything
    assert not missing, f"add {sorted(missing)} to the contracts in pyproject.toml"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    """The unit privacy is judged by: `jaxturbo.models`, `pallas_kernels.api`, `tests.cli`..."""
    return ".".join(module.split(".")[:2])


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(dotted: str) -> bool:
    return dotted.split(".")[0] in SCANNED


def private_uses(source: str, module: str) -> set[str]:
    """`module.name` for each private name of another package that `source` (the text of the
    module named `module`) imports or touches."""
    me = _package(module)
    tree = ast.parse(source, module)
    modules: dict[str, str] = {}  # local name -> the module it is bound to
    found: set[str] = set()

    def foreign(module: str) -> bool:
        return _ours(module) and _package(module) != me

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if _is_private(alias.name) and foreign(node.module):
                    found.add(f"{node.module}.{alias.name}")
                if _is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = top

    def resolve(expr: ast.expr) -> str | None:
        """The dotted module an expression like `a.b` names, if it is one of ours."""
        attrs = []
        while isinstance(expr, ast.Attribute):
            attrs.append(expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name) or expr.id not in modules:
            return None
        dotted = ".".join([modules[expr.id], *reversed(attrs)])
        return dotted if _is_module(dotted) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = resolve(node.value)
            if target and foreign(target):
                found.add(f"{target}.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setattr"
        ):
            target = resolve(node.args[0])
            if target and foreign(target):
                found.add(f"{target}.{node.args[1].value}")
    return found


def _scanned_files() -> list[Path]:
    return sorted(
        p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
    )


def test_private_name_scan_catches_each_form():
    source = (
        "from jaxturbo.parallel.ring import _merge\n"
        "from jaxturbo.cli import common\n"
        "import pallas_kernels.api as api\n"
        "from tests.cli import _own_package_is_fine\n"
        "from jaxturbo.models import __doc__\n"
        "common._x\n"
        "api.__name__\n"
        "monkeypatch.setattr(api, '_platform', None)\n"
    )
    assert private_uses(source, "tests.cli.test_probe") == {
        "jaxturbo.parallel.ring._merge",
        "jaxturbo.cli.common._x",
        "pallas_kernels.api._platform",
    }
    assert private_uses(source, "jaxturbo.cli.probe") == {
        "jaxturbo.parallel.ring._merge",
        "pallas_kernels.api._platform",
        "tests.cli._own_package_is_fine",
    }


def test_no_private_names_across_packages():
    uses = {
        (str(p.relative_to(ROOT)), name)
        for p in _scanned_files()
        for name in private_uses(p.read_text(), _module_name(p))
    }
    known = {(f, name) for f, names in KNOWN_PRIVATE_USES.items() for name in names}
    new = sorted(uses - known)
    gone = sorted(known - uses)
    assert not new, (
        "private names used across packages (make them public, or keep the use "
        f"inside the package): {new}"
    )
    assert not gone, f"fixed: remove these from KNOWN_PRIVATE_USES in {__file__}: {gone}"


if __name__ == "__main__":
    # `python -m tests.test_architecture`: today's cross-package private uses, by file
    found: dict[str, list[str]] = {}
    for p in _scanned_files():
        for name in sorted(private_uses(p.read_text(), _module_name(p))):
            found.setdefault(str(p.relative_to(ROOT)), []).append(name)
    for f, names in found.items():
        print(f, *names, sep="\n    ")
