"""Install paths.

The wheel works outside the repository: built from the project's files, installed into a folder
of its own, and run from another directory, it carries everything the commands read at run time
(mesh presets, the WikiText-2 text, the ladder modeling templates).  The dependencies come from
this test's environment (PYTHONPATH puts the installed copy first); each check asserts that the
installed copy, not the repository, was imported.

The accelerator extras (`jaxturbo[cuda]`, `jaxturbo[tpu]`) pin the runtime's JAX release and
resolve against the package index.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[1]
# what a build reads: the project's metadata and the two packages (meshes/ is the source that
# jaxturbo/parallel/meshes links to)
SOURCES = ("pyproject.toml", "README.md", "jaxturbo", "pallas_kernels", "meshes")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project's sources, installed with --target."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                src / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    wheels = list((tmp / "dist").glob("jaxturbo-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheels[0])],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    return tmp / "site"


def run_installed(
    site: Path, args: list[str], devices: int = 1, **kw
) -> subprocess.CompletedProcess:
    """`python ARGS` from a directory outside the repository, the installed copy first on the
    path."""
    env = cpu_env(devices, PYTHONPATH=str(site))
    cwd = site.parent / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, **kw
    )


# one interpreter for every in-process check: JAX and transformers start once
PROBE = """
import importlib, json, pkgutil
import jaxturbo, pallas_kernels
import jaxturbo.cli
from jaxturbo.cli import main
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.parallel.mesh import parse_mesh_spec, preset_names
from jaxturbo.bridge.ladder_hf import TEMPLATE_DIR

helps = {}
for info in pkgutil.iter_modules(jaxturbo.cli.__path__):
    mod = importlib.import_module(f"jaxturbo.cli.{info.name}")
    if not hasattr(mod, "NAME"):  # a command module defines NAME, HELP, add_arguments, run
        continue
    try:
        main([mod.NAME, "--help"])
    except SystemExit as e:
        helps[mod.NAME] = e.code
print(json.dumps({
    "files": [jaxturbo.__file__, pallas_kernels.__file__],
    "presets": preset_names(),
    "cpu8": parse_mesh_spec("cpu-8"),
    "wikitext_chars": len(WIKITEXT2_VALID.read_text()),
    "templates": sorted(p.name for p in TEMPLATE_DIR.glob("*.py")),
    "help_exit": helps,
}))
"""


@pytest.mark.slow
def test_installed_copy_has_its_data_and_every_command_helps(site):
    r = run_installed(site, ["-c", PROBE])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for f in got["files"]:
        assert Path(f).is_relative_to(site), f"imported {f}, not the installed copy in {site}"
    assert got["presets"] == sorted(p.stem for p in (ROOT / "meshes").glob("*.json"))
    assert got["cpu8"] == {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 8}
    assert got["wikitext_chars"] == len((ROOT / "jaxturbo/data/wikitext-2/valid.txt").read_text())
    assert got["templates"] == sorted(
        p.name for p in (ROOT / "jaxturbo/bridge/templates").glob("*.py")
    )
    assert got["help_exit"] and set(got["help_exit"].values()) == {0}, got["help_exit"]


@pytest.mark.slow
def test_module_entry_point_help_and_version(site):
    from jaxturbo import __version__

    r = run_installed(site, ["-m", "jaxturbo.cli", "--help"])
    assert r.returncode == 0, r.stderr
    for command in (
        "generate",
        "ppl",
        "export-hf",
        "sft",
        "rl",
        "convert-mla",
        "ladderize",
        "bench",
    ):
        assert command in r.stdout
    r = run_installed(site, ["-m", "jaxturbo.cli", "--version"])
    assert r.returncode == 0, r.stderr
    assert __version__ in r.stdout + r.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama that tensor parallelism over 8 devices divides (8 query and KV heads,
    vocab 256), with the character tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers.deepseek_tiny import save_with_tokenizer
    from tests.helpers.hf_tiny import TINY

    hc = LlamaConfig(
        **{
            **TINY,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "vocab_size": 256,
            "num_hidden_layers": 2,
        }
    )
    return save_with_tokenizer(
        AutoModelForCausalLM.from_config(hc), tmp_path_factory.mktemp("tiny") / "llama"
    )


@pytest.mark.slow
def test_installed_generate_over_a_mesh_preset(site, tiny_dir):
    r = run_installed(
        site,
        [
            "-m",
            "jaxturbo.cli",
            "generate",
            "--model",
            str(tiny_dir),
            "--mesh",
            "cpu-8",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
            "--no-stream",
        ],
        devices=8,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "generate printed nothing"
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_installed_bench_explains_it_needs_a_clone(site):
    r = run_installed(site, ["-m", "jaxturbo.cli", "bench", "ladder", "--preset", "tiny"])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "experiments" in lines[0] or "clone" in lines[0], lines[0]


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
JAX_PIN = next(r for r in PROJECT["dependencies"] if r.startswith("jax=="))  # "jax==0.11.2"
JAX_VERSION = JAX_PIN.split("==")[1]
# what each extra must bring, at the pinned JAX version where the package follows JAX's releases
EXTRA_PACKAGES = {
    "cuda": {"jax-cuda13-plugin": JAX_VERSION, "jax-cuda13-pjrt": JAX_VERSION},
    "tpu": {"libtpu": None},
}
# pip's messages when the index cannot be reached (as opposed to a requirement it cannot meet)
UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish|Temporary failure in name "
    r"resolution|Network is unreachable|ConnectTimeout|ReadTimeout|"
    r"Could not fetch URL"
)


@pytest.mark.parametrize("extra", sorted(EXTRA_PACKAGES))
def test_extra_pins_the_runtime_jax(extra):
    reqs = PROJECT["optional-dependencies"][extra]
    assert reqs == [f"jax[{'cuda13' if extra == 'cuda' else extra}]=={JAX_VERSION}"], reqs


@pytest.mark.slow
@pytest.mark.parametrize("extra", sorted(EXTRA_PACKAGES))
def test_extra_resolves_against_the_index(extra, tmp_path):
    """pip resolves the extra's requirements (metadata only, nothing installed)."""
    report = tmp_path / "report.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--timeout",
            "20",
            "--retries",
            "1",
            "--report",
            str(report),
            *PROJECT["optional-dependencies"][extra],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0 and UNREACHABLE.search(r.stderr):
        pytest.skip(
            f"the package index is unreachable from here: {UNREACHABLE.search(r.stderr)[0]}"
        )
    assert r.returncode == 0, r.stderr
    got = {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert got.get("jax") == got.get("jaxlib") == JAX_VERSION, got
    for name, version in EXTRA_PACKAGES[extra].items():
        assert name in got, f"{extra}: {name} not in the resolution {sorted(got)}"
        if version:
            assert got[name] == version, (name, got[name])
