"""A local Sphinx extension: the site's own CSS and JavaScript, on top of sphinx-book-theme.

- static/site.css: at phone width nothing makes the page scroll sideways
  (inline code wraps, wide math and tables scroll inside their own box) and
  figures shrink to the column keeping their proportions.
- static/sidebar-toggles.js: the navigation and contents buttons work again
  (pydata-sphinx-theme 0.17 bug, https://github.com/pydata/pydata-sphinx-theme/issues/2451).
- Figures load lazily (`<img loading="lazy">`): a first visit fetches the
  ones on screen, the rest as the reader scrolls to them.
"""

from __future__ import annotations

import pathlib

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform

STATIC = pathlib.Path(__file__).resolve().parent / "static"


def _add_static(app) -> None:
    app.config.html_static_path.append(str(STATIC))


class LazyImages(SphinxPostTransform):
    default_priority = 900
    formats = ("html",)

    def run(self, **kwargs) -> None:
        for image in self.document.findall(nodes.image):
            image.setdefault("loading", "lazy")  # docutils' HTML writer reads it


def setup(app):
    app.add_post_transform(LazyImages)
    app.connect("builder-inited", _add_static)
    app.add_css_file("site.css")
    app.add_js_file("sidebar-toggles.js", loading_method="defer")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
