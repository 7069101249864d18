"""A local Sphinx extension: each chapter's number is the one in its file name.

The chapters are numbered by the book's map (0-13), and the prose says
"chapter 11" for `11_decoding`. Sphinx numbers a toctree 1, 2, 3, ... in order,
so a chapter of the map that is not written yet would shift every later number.
After Sphinx assigns its numbers, this replaces each chapter's first number,
of its sections and of its figures alike, with the two digits its file starts with.
"""

from __future__ import annotations

import re

from docutils import nodes

CHAPTER = re.compile(r"(?:^|/)(\d\d)_[^/]+$")


def _renumber(app, env) -> list[str]:
    changed = []
    for docname, sections in env.toc_secnumbers.items():
        match = CHAPTER.search(docname)
        if match is None:
            continue
        number = int(match.group(1))
        env.toc_secnumbers[docname] = {anchor: (number, *n[1:]) if n else n for anchor, n in sections.items()}
        for figtype, figures in env.toc_fignumbers.get(docname, {}).items():
            env.toc_fignumbers[docname][figtype] = {
                fid: (number, *n[1:]) if n and len(n) > 1 else n for fid, n in figures.items()
            }
        # The sidebar reads the numbers stored on the nodes of each page's table of contents.
        numbered = [*env.tocs[docname].findall(nodes.reference)] if docname in env.tocs else []
        if docname in env.titles:
            numbered.append(env.titles[docname])
        for node in numbered:
            if node.get("secnumber"):
                node["secnumber"] = [number, *node["secnumber"][1:]]
        changed.append(docname)
    return changed


def setup(app):
    app.connect("env-get-updated", _renumber, priority=900)  # after Sphinx's own numbering (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
