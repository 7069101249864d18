"""Static checks on the stored chapters; nbval (run by the same `pytest`) re-executes them.

Stored outputs must come from one clean top-to-bottom run, because a notebook
stored without outputs would pass nbval while checking nothing.
"""

from __future__ import annotations

import pathlib
import re
import sys

import nbformat
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import notebooks as nbtool  # noqa: E402

TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
PAGES = {"chapters/references", "chapters/run_locally"}  # plain Markdown pages, not notebooks
TOC_ENTRIES = [c["file"] for part in TOC["parts"] for c in part["chapters"]] if "parts" in TOC else [
    c["file"] for c in TOC["chapters"]
]
TOC_FILES = [f for f in [TOC["root"]] + TOC_ENTRIES if f not in PAGES]
CODE_WIDTH = 88  # characters: what the site's column shows without a sideways scroll
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
IGNORE_TAGS = {"nbval-ignore-output", "nbval-skip", "skip-execution"}
MACHINE_TEXT = re.compile(r"/work/|/root/|/home/|/Users/|/tmp/ipykernel|\.venv/|0x[0-9a-fA-F]{6,}")


def load(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    return "\n".join(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))


def test_toc_and_chapters_match():
    assert sorted(f"chapters/{p.stem}" for p in CHAPTERS) == sorted(TOC_FILES)


@pytest.fixture(params=CHAPTERS, ids=[p.stem for p in CHAPTERS])
def nb(request):
    return load(request.param)


def test_stored_from_one_clean_run(nb):
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert any(c.outputs for c in cells), "no stored outputs: nbval would compare nothing"
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_setup_cell_matches_config(nb):
    """The first code cell installs `mha` from the repository named in _config.yml, and prints nothing here."""
    first = code_cells(nb)[0]
    assert first.source == nbtool.setup_source(), "run `make notebooks` to rewrite the setup cell"
    assert first.outputs == []
    assert "setup" in first.metadata.get("tags", [])


def test_imports_mha(nb):
    sources = "\n".join(c.source for c in code_cells(nb)[1:])
    assert re.search(r"^\s*(import mha|from mha)", sources, re.M), "a chapter imports the package it teaches"


def test_no_unexpected_errors_or_stderr(nb):
    for i, cell in enumerate(code_cells(nb), 1):
        tags = cell.metadata.get("tags", [])
        kinds = {o.output_type for o in cell.outputs}
        if "raises-exception" in tags:
            assert "error" in kinds, f"cell {i} is tagged raises-exception but raised nothing"
        else:
            assert "error" not in kinds, f"cell {i} raised:\n{cell.source}"
        stderr = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        if "expect-stderr" not in tags:
            assert not stderr, f"cell {i} wrote to stderr (a warning?):\n{''.join(stderr)}"


def test_no_machine_paths_or_addresses(nb):
    for i, cell in enumerate(code_cells(nb), 1):
        for output in cell.outputs:
            found = MACHINE_TEXT.findall(output_text(output))
            assert not found, f"cell {i} output shows {found}"


def test_exercises_with_hidden_checked_solutions(nb):
    solutions = [c for c in code_cells(nb) if "solution" in c.metadata.get("tags", [])]
    assert 2 <= len(solutions) <= 4, f"{len(solutions)} exercise solutions"
    for cell in solutions:
        # tools/notebooks.py writes these: one toggle hides the code and the printed answer.
        tags = cell.metadata["tags"]
        assert "hide-cell" in tags and "hide-input" not in tags, f"run tools/notebooks.py: tags {tags}"
        assert cell.metadata.get("mystnb", {}).get("code_prompt_show") == "Show solution"
        assert "assert" in cell.source, "a solution checks its own answer"
    headings = [c for c in nb.cells if c.cell_type == "markdown" and re.search(r"^#+ Exercise", c.source, re.M)]
    assert len(headings) == len(solutions)


def test_exempt_cells_say_why(nb):
    """Cells exempt from nbval's comparison are few, and each says why in its first line."""
    for cell in code_cells(nb):
        tags = IGNORE_TAGS & set(cell.metadata.get("tags", []))
        if tags:
            first = cell.source.splitlines()[0]
            assert first.startswith("# Not compared:"), f"{tags} without a reason: {first}"


def test_repository_named_as_in_config():
    """Every `git clone` or `pip install git+...` in the prose names the repository in _config.yml."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    texts = {p.name: "\n".join(c.source for c in load(p).cells if c.cell_type == "markdown") for p in CHAPTERS}
    texts.update({p.name: p.read_text() for p in (ROOT / "chapters").glob("*.md")})
    texts["README.md"] = (ROOT / "README.md").read_text()
    for name, text in texts.items():
        for found in re.findall(r"(?:git clone |git\+)(https://github\.com/[\w.-]+/[\w-]+)", text):
            assert found == url, f"{name} names {found}, _config.yml {url}"


def test_code_lines_fit_the_column(nb):
    """No code line wider than the site's column (and a formatter's default)."""
    for i, cell in enumerate(code_cells(nb), 1):
        for line in cell.source.splitlines():
            assert len(line) <= CODE_WIDTH, f"cell {i}: a {len(line)}-character line: {line.strip()[:60]}..."


def test_figures_have_alt_text_and_a_caption(nb):
    """Every cell that draws a figure says what it shows, for screen readers and as a caption."""
    for i, cell in enumerate(code_cells(nb), 1):
        if not any("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}) for o in cell.outputs):
            continue
        mystnb = cell.metadata.get("mystnb", {})
        alt = mystnb.get("image", {}).get("alt", "").strip()
        caption = mystnb.get("figure", {}).get("caption", "").strip()
        assert alt and caption, f"cell {i} draws a figure: give it mystnb image.alt and figure.caption metadata"
        assert alt != caption, f"cell {i}: the alt text describes the picture, the caption says what to see"


def title(path: pathlib.Path) -> str:
    for cell in load(path).cells:
        match = re.search(r"^# (.+)$", cell.source, re.M) if cell.cell_type == "markdown" else None
        if match:
            return match.group(1).strip()
    raise AssertionError(f"{path.name} has no # title")


def test_welcome_page_lists_every_chapter_in_order():
    """Chapter 0 links every chapter of _toc.yml, in its order, by its title: none forgotten."""
    root = ROOT / f"{TOC['root']}.ipynb"
    text = "\n".join(c.source for c in load(root).cells if c.cell_type == "markdown")
    links = [(t.strip(), target) for t, target in re.findall(r"\[([^\]]+)\]\((\d\d_[\w-]+\.ipynb)\)", text)]
    firsts = []  # the first link to each chapter, in the order they appear
    for link in links:
        if link[1] not in [t for _, t in firsts]:
            firsts.append(link)
    chapters = [f for f in TOC_ENTRIES if f not in PAGES]
    assert [t for _, t in firsts] == [f"{pathlib.Path(f).name}.ipynb" for f in chapters], (
        f"chapter 0 links {[t for _, t in firsts]}; _toc.yml has {chapters}"
    )
    for text_, target in firsts:
        path = ROOT / "chapters" / target
        assert text_ == title(path), f"chapter 0 calls {target} {text_!r}, its title is {title(path)!r}"
    assert not re.search(r"being written|appear here soon|coming soon", text, re.I), "a stale promise on the welcome page"
