"""The reader's Colab path: a chapter run where `mha` is not installed.

Colab has NumPy, torch, TensorFlow and matplotlib but not `mha`; the setup
cell at the top of every chapter pip-installs it from the repository. Here a
fresh virtual environment sees the book's dependencies but not `mha`, the
setup cell installs it from this checkout (through MHA_SOURCE, which the cell
honours), and the chapter must run through.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "chapters" / "01_softmax.ipynb"


def site_without_mha(view: pathlib.Path) -> pathlib.Path:
    """A folder of links to every installed package of this environment except `mha`."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if "mha" in entry.name.lower() and ("editable" in entry.name or entry.name.startswith("mha")):
            continue
        (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture
def colab_like(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Like Colab's preinstalled packages: importable, but not part of this venv's own install.
    pathlib.Path(purelib, "book_dependencies.pth").write_text(str(site_without_mha(tmp_path / "deps")) + "\n")
    probe = subprocess.run([str(python), "-c", "import numpy, torch, keras, mha"], capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'mha'" in probe.stderr, probe.stderr
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (no mha)", "language": "python"}
    (kernels / "kernel.json").write_text(json.dumps(spec))
    return tmp_path, python, purelib


def test_chapter_installs_mha_and_runs_through(colab_like, monkeypatch):
    tmp, python, purelib = colab_like
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    monkeypatch.setenv("MHA_SOURCE", str(ROOT))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(CHAPTER, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import mha\nprint(mha.__file__)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp)}})
    client.execute()  # raises CellExecutionError if any cell fails
    where = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert where.startswith(purelib), f"mha came from {where}, not from the setup cell's install"
    installed = subprocess.run([str(python), "-m", "pip", "show", "mha"], capture_output=True, text=True, env={**os.environ})
    assert "Name: mha" in installed.stdout
