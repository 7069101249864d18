"""Re-executes chapters top to bottom in a fresh kernel and stores their outputs.

This is the only way notebook outputs are written (`make notebooks`, or
`make notebooks NB=chapters/03_masking.ipynb` for one chapter). Before running,
it writes the setup cell, the first code cell of every chapter, from
`_config.yml`, so the repository URL lives in one place.

    python tools/notebooks.py chapters/*.ipynb
"""

from __future__ import annotations

import pathlib
import sys
import time

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUP_TAG = "setup"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def install_target() -> str:
    """What the setup cell pip-installs: the repository's `mha`, pinned to the book's branch."""
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    return f"git+{repo['url']}@{repo['branch']}"


def setup_source() -> str:
    # Code lines stay within 88 characters, like every code cell of the book.
    return f'''\
# Setup. In Colab this installs the book's package, `mha`, from the book's
# repository; where `mha` is already importable (a local run) it does nothing.
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no TensorFlow C++ start-up log
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# GPUs since Ampere (Colab's A100, L4) run float32 matmuls in TF32 (10-bit mantissa)
# unless told not to; that would break the book's 1e-5 agreements.
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
%config InlineBackend.figure_formats = ["retina"]  # figures sharp on dense screens
try:
    import mha
except ImportError:
    BOOK_REPOSITORY = "{install_target()}"
    MHA_SOURCE = os.environ.get("MHA_SOURCE", BOOK_REPOSITORY)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", MHA_SOURCE]
    run = subprocess.run(pip, capture_output=True, text=True)
    if run.returncode != 0:
        why = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(
            f"could not install the book's package `mha` from {{MHA_SOURCE}} "
            f"(pip: {{why}}); check the network, or set the environment variable "
            f"MHA_SOURCE to another pip source of mha"
        ) from None
    import importlib

    importlib.invalidate_caches()
    import mha'''


def setup_cell_index(nb) -> int:
    """The first code cell, which must be the setup cell."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            return i
    raise ValueError("a chapter needs at least one code cell, the setup cell")


SOLUTION_PROMPTS = {"code_prompt_show": "Show solution", "code_prompt_hide": "Hide solution"}


def hide_solution(cell) -> None:
    """One toggle hides a solution's code *and* its printed answer on the site.

    myst-nb's `hide-cell` wraps input and output in one <details>; `hide-input`
    would fold only the code and leave the answer showing below it.
    """
    tags = [t for t in cell.metadata.get("tags", []) if t not in ("hide-input", "hide-output")]
    if "hide-cell" not in tags:
        tags.append("hide-cell")
    cell.metadata["tags"] = tags
    cell.metadata["mystnb"] = {**cell.metadata.get("mystnb", {}), **SOLUTION_PROMPTS}  # keeps alt/caption


def prepare(nb) -> None:
    i = setup_cell_index(nb)
    nb.cells[i].source = setup_source()
    tags = nb.cells[i].metadata.setdefault("tags", [])
    for tag in (SETUP_TAG, "remove-cell"):  # hidden on the site: readers there need no install
        if tag not in tags:
            tags.append(tag)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
            if "solution" in cell.metadata.get("tags", []):
                hide_solution(cell)
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}


def execute(path: pathlib.Path) -> float:
    nb = nbformat.read(path, as_version=4)
    prepare(nb)
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises on the first unexpected error; cells tagged raises-exception may fail
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}  # nothing machine-specific
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: python tools/notebooks.py chapters/*.ipynb")
    for p in paths:
        seconds = execute(pathlib.Path(p))
        print(f"{p}: executed in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
