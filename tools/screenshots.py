"""Full-page screenshots of every chapter of the built site, to look at as a reader.

    make screenshots    # builds the site, then writes _build/screenshots/full/NN_name-MODE.png

Each chapter is opened at desktop (1366x900) and phone (390x844) width, light
and dark, in Debian's Chromium driven by Playwright, after MathJax has typeset
and every image has loaded. `make test`'s browser test keeps only the first
screen of each page (a full page of a long chapter takes seconds to encode);
this command takes the whole page, for the eyes.
"""

from __future__ import annotations

import functools
import http.server
import pathlib
import shutil
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
OUT = ROOT / "_build" / "screenshots" / "full"
DESKTOP, PHONE = (1366, 900), (390, 844)  # the widths tests/test_site.py reads the site at, too
MODES = {  # name: (viewport, colour mode)
    "desktop-light": (DESKTOP, "light"), "desktop-dark": (DESKTOP, "dark"),
    "phone-light": (PHONE, "light"), "phone-dark": (PHONE, "dark"),
}
LOAD_ALL_IMAGES_JS = """() => Promise.all(Array.from(document.images).map((img) => {
  img.loading = "eager";
  return img.complete && img.naturalWidth ? true : new Promise((ok) => { img.onload = img.onerror = ok; });
}))"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    from playwright.sync_api import sync_playwright  # here: tests/test_site.py imports this module's constants

    if not HTML.exists():
        sys.exit("no _build/html: run `make book` first")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed: `apt-get install chromium` (see README.md)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(HTML)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/chapters/"
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for page_file in sorted((HTML / "chapters").glob("*.html")):
            for mode, ((width, height), colour) in MODES.items():
                context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=colour,
                                              is_mobile=width < 600, has_touch=width < 600, device_scale_factor=1)
                context.add_init_script(f"localStorage.setItem('mode', '{colour}');")
                page = context.new_page()
                page.goto(base + page_file.name, wait_until="load")
                page.evaluate("() => window.MathJax?.startup?.promise")
                page.evaluate(LOAD_ALL_IMAGES_JS)
                page.screenshot(path=str(OUT / f"{page_file.stem}-{mode}.png"), full_page=True)
                context.close()
        browser.close()
    server.shutdown()
    print(f"{len(list(OUT.glob('*.png')))} screenshots in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
