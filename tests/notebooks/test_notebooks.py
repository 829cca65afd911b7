"""Every notebook under notebooks/ runs end to end (tiny presets, CPU)."""

import shutil
from pathlib import Path

import pytest

# the notebook runner; the GPU machine's image lacks both
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch, request):
    # The notebooks write exports and checkpoints under tempfile.mkdtemp() (04_sft: 1.4 GB of
    # SmolLM2 weights and Adam state); the kernel inherits TMPDIR, and the folder goes when the
    # notebook is done, so a test run leaves no gigabytes behind on a shared disk.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # The notebooks' small presets (fewer steps, tokens and windows; every cell and code path
    # still runs): the suite checks that they run, a reader opening one gets the full settings.
    monkeypatch.setenv("JAXTURBO_NOTEBOOK_SMOKE", "1")
    if "smollm2-135m" in path.read_text():
        # converted once per run under the suite's file lock (tests/conftest.py): the kernel's
        # load_model("smollm2-135m") finds it in the run's JAXTURBO_CACHE instead of converting
        # it again while another worker may be doing the same
        request.getfixturevalue("smollm2_dir")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()  # raises CellExecutionError on any failing cell
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
