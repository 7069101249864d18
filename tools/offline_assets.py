"""A local Sphinx extension: the site serves everything itself, so it reads offline, and light.

Sphinx loads MathJax from a public CDN by default; many readers sit behind
networks where that is slow or blocked. On every build this installs the
MathJax version pinned in package.json with npm (`npm ci`, once: skipped when
node_modules already holds it) and copies into the site's _static folder only
the MathJax components the site loads (`MATHJAX_FILES`: the loader, TeX input,
HTML-CSS output and its fonts, about 1.3 MB of the 24 MB package), which
`mathjax3_config.loader` in _config.yml names.

It also drops sphinx-thebe's scripts, which Jupyter Book 1.x always loads
(twice, which throws a console error on every page) and which point at a
CDN: the book has no live-code button, its readers use Colab.

And it stops shipping what no reader needs: pydata-sphinx-theme's
fontawesome.js (1.46 MB, loaded by every page only to let authors add custom
SVG icons; the theme's CSS draws the same icons from the Font Awesome web
fonts), the source maps (`*.map`, for debugging the theme's own bundles) and
the theme's translation catalogues (`_static/locales`, an English site needs none).
The Font Awesome web fonts themselves (1 MB, 275 kB of them on every first
visit) are cut down to the few icons the pages use (fontTools, which
matplotlib brings): `_static/fontawesome-subset.css`, loaded after the
theme's CSS, declares the same font faces again from the subsets, and the
last declaration wins.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

# Relative to node_modules/mathjax/es5; a folder means everything in it.
MATHJAX_FILES = [
    "startup.js",  # the loader: reads window.MathJax.loader.load
    "core.js",
    "input/tex.js",  # TeX with ams, newcommand, noundefined, require, autoload, configmacros
    "input/tex/extensions",  # what autoload fetches on first use of a macro (\cancel, \boldsymbol, ...)
    "output/chtml.js",
    "output/chtml/fonts/tex.js",
    "output/chtml/fonts/woff-v2",
    "a11y/assistive-mml.js",  # hidden MathML that screen readers read
]
FONTAWESOME_JS = re.compile(r'\s*<script defer src="[^"]*_static/scripts/fontawesome\.js[^"]*"></script>')
FONTAWESOME_SUBSET_CSS = "fontawesome-subset.css"
FONTAWESOME_FACES = [  # (family, weight, the theme's font file without suffix)
    ("Font Awesome 6 Free", 900, "fa-solid-900"),
    ("Font Awesome 6 Free", 400, "fa-regular-400"),
    ("Font Awesome 6 Brands", 400, "fa-brands-400"),
]
ICON_RULE = re.compile(r"([^{}]*)\{([^{}]*)\}")
ICON_CLASS = re.compile(r"\bfa-[a-z0-9-]+")
CODEPOINT = re.compile(r'content:\s*"\\(f[0-9a-f]{3})"')


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
    source = root / "node_modules" / "mathjax" / "es5"
    static = root / "node_modules" / ".site_static"
    shutil.rmtree(static, ignore_errors=True)  # nothing left over from a wider copy
    for name in MATHJAX_FILES:
        src, dst = source / name, static / "mathjax" / "es5" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    app.config.html_static_path.append(str(static))


def _drop_thebe(app, pagename, templatename, context, doctree) -> None:
    def thebe(asset) -> bool:
        return "thebe" in (asset.filename or "") or "THEBE_JS_URL" in asset.attributes.get("body", "")

    context["script_files"] = [js for js in context.get("script_files", []) if not thebe(js)]
    context["css_files"] = [css for css in context.get("css_files", []) if not thebe(css)]


def _drop_unused(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    out = pathlib.Path(app.outdir)
    static = out / "_static"
    # The theme writes its fontawesome.js tag from a template macro, not from
    # script_files, so the tag is taken out of the written pages.
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        lean = FONTAWESOME_JS.sub("", text)
        if lean != text:
            page.write_text(lean, encoding="utf-8")
    for path in {*static.rglob("*.map"), *static.glob("scripts/fontawesome.js*"), *static.glob("sphinx-thebe.*")}:
        path.unlink()
    shutil.rmtree(static / "locales", ignore_errors=True)
    _subset_fontawesome(out, static)


def _subset_fontawesome(out: pathlib.Path, static: pathlib.Path) -> None:
    """Font Awesome fonts holding only the icons the site shows, and the CSS that serves them."""
    import pydata_sphinx_theme
    from fontTools import subset

    theme_fonts = pathlib.Path(pydata_sphinx_theme.__file__).parent / "theme/pydata_sphinx_theme/static/vendor/fontawesome/webfonts"

    icons, codepoints = set(), set()
    for page in [*out.rglob("*.html"), *static.rglob("*.js")]:
        icons.update(ICON_CLASS.findall(page.read_text(encoding="utf-8", errors="ignore")))
    for sheet in static.rglob("*.css"):
        for selectors, body in ICON_RULE.findall(sheet.read_text(encoding="utf-8")):
            points = CODEPOINT.findall(body)
            if not points:
                continue
            names = {s.strip().split(":")[0].lstrip(".") for s in selectors.split(",")}
            if names & icons or not all(n.startswith("fa-") for n in names):
                codepoints.update(int(p, 16) for p in points)  # an icon a page uses, or a rule's own icon
    fonts = static / "vendor" / "fontawesome" / "webfonts"
    faces = []
    for family, weight, name in FONTAWESOME_FACES:
        source = theme_fonts / f"{name}.ttf"  # the theme's own copy: every build subsets afresh
        options = subset.Options()
        options.flavor = "woff"  # zlib; woff2 would need brotli, which is not installed
        options.layout_features = ["*"]
        font = subset.load_font(str(source), options)
        subsetter = subset.Subsetter(options)
        subsetter.populate(unicodes=codepoints)
        subsetter.subset(font)
        subset.save_font(font, str(fonts / f"{name}.subset.woff"), options)
        faces.append(
            f'@font-face {{ font-display: block; font-family: "{family}"; font-style: normal; '
            f'font-weight: {weight}; src: url("vendor/fontawesome/webfonts/{name}.subset.woff") format("woff"); }}'
        )
        (fonts / f"{name}.ttf").unlink(missing_ok=True)
        (fonts / f"{name}.woff2").unlink(missing_ok=True)
    (static / FONTAWESOME_SUBSET_CSS).write_text("\n".join(faces) + "\n")


def setup(app):
    app.connect("builder-inited", _install)
    app.connect("html-page-context", _drop_thebe)
    app.connect("build-finished", _drop_unused)
    app.add_css_file(FONTAWESOME_SUBSET_CSS, priority=900)  # after the theme's CSS
    return {"parallel_read_safe": True, "parallel_write_safe": True}
