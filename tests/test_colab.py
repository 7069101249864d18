"""The reader's Colab path: a chapter run where `mha` is not installed.

Colab has NumPy, torch, TensorFlow and matplotlib but not `mha`; the setup
cell at the top of every chapter pip-installs it from the repository. Here a
fresh virtual environment sees the book's dependencies but not `mha`, the
setup cell installs it from this checkout (through MHA_SOURCE, which the cell
honours), and the chapter must run through, printing nothing of pip's. When
the install fails, the setup cell raises one error that says where it tried
to install from and how to point it elsewhere.
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
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "chapters" / "01_softmax.ipynb"
sys.path.insert(0, str(ROOT / "tools"))
import notebooks as nbtool  # noqa: E402


def site_without_mha(view: pathlib.Path) -> pathlib.Path:
    """A folder of links to every installed package of this environment except `mha`."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if "mha" in entry.name.lower() and ("editable" in entry.name or entry.name.startswith("mha")):
            continue
        (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture(scope="module")
def colab_like(tmp_path_factory):
    """One fresh venv for the module: the failing install runs first and leaves it without `mha`."""
    tmp_path = tmp_path_factory.mktemp("colab")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on it would make `mha` importable
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip takes 3 s): pip comes, like Colab's, with the preinstalled packages.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()
    # Like Colab's preinstalled packages: importable, but not part of this venv's own install.
    pathlib.Path(purelib, "book_dependencies.pth").write_text(str(site_without_mha(tmp_path / "deps")) + "\n")
    probe = subprocess.run(  # found without importing them (torch and keras take seconds to import)
        [str(python), "-c", "import importlib.util as u; print([bool(u.find_spec(m)) for m in "
         "('numpy', 'torch', 'keras', 'nbformat', 'pip', 'mha')])"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert probe.stdout.strip() == "[True, True, True, True, True, False]", probe.stdout + probe.stderr
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (no mha)", "language": "python"}
    (kernels / "kernel.json").write_text(json.dumps(spec))
    return tmp_path, python, purelib


def test_failed_install_raises_one_clear_error(colab_like, monkeypatch):
    tmp, python, purelib = colab_like
    missing = tmp / "no-such-checkout"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    monkeypatch.setenv("MHA_SOURCE", str(missing))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(nbtool.setup_source())])
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    errors = [o for o in nb.cells[0].outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "RuntimeError", nb.cells[0].outputs
    message = errors[0].evalue
    assert str(missing) in message and "MHA_SOURCE" in message, message
    assert "ModuleNotFoundError" not in "".join(errors[0].traceback), "the ImportError is not chained in"


def test_chapter_installs_mha_and_runs_through(colab_like, monkeypatch):
    tmp, python, purelib = colab_like
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    monkeypatch.setenv("MHA_SOURCE", str(ROOT))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(CHAPTER, as_version=4)
    nbtool.prepare(nb)  # the setup cell tools/notebooks.py writes (test_notebooks checks the stored one is it)
    nb.cells.append(nbformat.v4.new_code_cell("import mha\nprint(mha.__file__)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp)}})
    client.execute()  # raises CellExecutionError if any cell fails
    setup = nb.cells[nbtool.setup_cell_index(nb)]
    assert setup.outputs == [], f"the install printed {setup.outputs} (pip's restart-the-kernel note?)"
    where = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert where.startswith(purelib), f"mha came from {where}, not from the setup cell's install"
    installed = subprocess.run([str(python), "-m", "pip", "show", "mha"], capture_output=True, text=True, env={**os.environ})
    assert "Name: mha" in installed.stdout


def test_setup_cell_turns_tf32_off_before_tensorflow_loads():
    source = nbtool.setup_source()
    assert 'os.environ["NVIDIA_TF32_OVERRIDE"] = "0"' in source
    assert "import tensorflow" not in source and "import keras" not in source and "import mha" in source
    assert source.index("NVIDIA_TF32_OVERRIDE") < source.index("import mha")  # mha.keras imports TensorFlow
    assert "%pip" not in source, "%pip prints a restart-the-kernel note and does not raise on failure"
