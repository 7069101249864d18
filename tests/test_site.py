"""The built site, read in a real browser (Debian's Chromium, driven by Playwright), offline.

Every page loads with no console error, every image loads, the math is
typeset, no request leaves localhost, hidden solutions open on click, the
search finds "softmax", and each chapter's Colab link opens that chapter's
notebook on `main`. Screenshots of three pages land in _build/screenshots/.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import shutil
import threading
import urllib.parse

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [  # no background traffic of Chromium's own: only the page's requests remain
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = {"welcome": "chapters/00_welcome.html", "masking": "chapters/03_masking.html", "search": "search.html?q=softmax"}


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed: `apt-get install chromium` (see README.md)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must test the site, never skip it
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def site(built_site):
    html, problems = built_site
    assert not problems, "the site must build cleanly first:\n" + "\n".join(problems)
    handler = functools.partial(QuietHandler, directory=str(html))
    server = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield html, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser closing a connection early (a page left mid-load) is not a site error


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Visit:
    """One browser page that records every request, console error and page error."""

    def __init__(self, browser, base: str):
        self.base = base
        self.external, self.errors, self.failed = [], [], []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))

    def _route(self, route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def open(self, path: str):
        self.page.goto(self.base + path, wait_until="load")
        if path == "index.html":  # the root redirects to chapter 0
            self.page.wait_for_url("**/chapters/00_welcome.html")
            self.page.wait_for_load_state("load")
        # MathJax typesets after load; wait for it where the page loads it.
        self.page.evaluate("() => window.MathJax?.startup?.promise")
        return self.page

    def close(self):
        self.context.close()


def pages(html: pathlib.Path) -> list[str]:
    return sorted(
        p.relative_to(html).as_posix()
        for p in html.rglob("*.html")
        if not p.relative_to(html).parts[0].startswith("_")
    )


def test_every_page_reads_offline(site, browser):
    html, base = site
    visit = Visit(browser, base)
    checked_pages, checked_images, typeset = 0, 0, 0
    try:
        for path in pages(html):
            page = visit.open(path)
            images = page.eval_on_selector_all("img", "xs => xs.map(i => [i.src, i.complete, i.naturalWidth])")
            broken = [src for src, complete, width in images if not (complete and width > 0)]
            assert not broken, f"{path}: images that did not load: {broken}"
            math = page.locator(".math").count()
            if math:
                rendered = page.locator("mjx-container").count()
                assert rendered >= math, f"{path}: {math} math elements, {rendered} typeset"
                typeset += rendered
            checked_pages += 1
            checked_images += len(images)
    finally:
        visit.close()
    print(f"{checked_pages} pages, {checked_images} images, {typeset} formulas, {len(visit.external)} external requests")
    assert visit.external == [], f"requests that left localhost: {visit.external}"
    assert visit.errors == [] and visit.failed == [], visit.errors + visit.failed
    assert checked_pages >= 10 and checked_images > 0 and typeset > 0


def test_solutions_open_on_click(site, browser):
    html, base = site
    visit = Visit(browser, base)
    try:
        page = visit.open("chapters/01_softmax.html")
        solution = page.locator(".tag_solution details").first
        code = solution.locator(".cell_input")
        assert not code.is_visible()
        solution.locator("summary").click()
        code.wait_for(state="visible")
        assert "assert" in code.inner_text()
    finally:
        visit.close()


def test_search_finds_softmax(site, browser):
    html, base = site
    visit = Visit(browser, base)
    try:
        page = visit.open("search.html?q=softmax")
        results = page.locator("#search-results ul.search li")
        results.first.wait_for(timeout=15000)
        assert results.count() >= 3
        assert "softmax" in page.locator("#search-results").inner_text().lower()
    finally:
        visit.close()


def test_colab_links_point_at_each_chapter_on_main(site, browser):
    html, base = site
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    slug = urllib.parse.urlsplit(repo["url"]).path.strip("/")
    visit = Visit(browser, base)
    try:
        for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
            page = visit.open(f"chapters/{notebook.stem}.html")
            links = page.eval_on_selector_all("a[href*='colab.research.google.com']", "xs => xs.map(a => a.href)")
            expected = f"https://colab.research.google.com/github/{slug}/blob/{repo['branch']}/chapters/{notebook.name}"
            assert links == [expected], f"{notebook.name}: {links}"
            downloads = page.eval_on_selector_all("a[href$='.ipynb']", "xs => xs.map(a => a.href)")
            assert any(d.endswith(f"_sources/chapters/{notebook.name}") for d in downloads), downloads
    finally:
        visit.close()
    assert visit.external == []


def test_screenshots(site, browser):
    html, base = site
    out = html.parent / "screenshots"
    out.mkdir(exist_ok=True)
    visit = Visit(browser, base)
    try:
        for name, path in SCREENSHOTS.items():
            page = visit.open(path)
            if name == "search":
                page.locator("#search-results ul.search li").first.wait_for(timeout=15000)
            page.screenshot(path=str(out / f"{name}.png"), full_page=False)
            assert (out / f"{name}.png").stat().st_size > 10_000
    finally:
        visit.close()
