"""A local Sphinx extension: the site serves everything itself, so it reads offline.

Sphinx loads MathJax from a public CDN by default; many readers sit behind
networks where that is slow or blocked. On every build this installs the
MathJax version pinned in package.json with npm (`npm ci`, once: skipped when
node_modules already holds it) and copies it into the site's _static folder.

It also drops sphinx-thebe's scripts, which Jupyter Book 1.x always loads
(twice, which throws a console error on every page) and which point at a
CDN: the book has no live-code button, its readers use Colab.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess



def _install(app) -> None:
    root = pathlib.Path(app.srcdir)
    installed = root / "node_modules" / "mathjax" / "package.json"
    wanted = json.loads((root / "package.json").read_text())["dependencies"]["mathjax"]
    if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("the book build needs npm (Node.js) to install MathJax: see README.md")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=root, check=True)
    # html_static_path copies a folder's contents into _static: this one holds mathjax/es5/.
    static = root / "node_modules" / ".site_static"
    shutil.copytree(root / "node_modules" / "mathjax" / "es5", static / "mathjax" / "es5", dirs_exist_ok=True)
    app.config.html_static_path.append(str(static))


def _drop_thebe(app, pagename, templatename, context, doctree) -> None:
    def thebe(asset) -> bool:
        return "thebe" in (asset.filename or "") or "THEBE_JS_URL" in asset.attributes.get("body", "")

    context["script_files"] = [js for js in context.get("script_files", []) if not thebe(js)]
    context["css_files"] = [css for css in context.get("css_files", []) if not thebe(css)]


def setup(app):
    app.connect("builder-inited", _install)
    app.connect("html-page-context", _drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
