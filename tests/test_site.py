"""The built site, read in a real browser (Debian's Chromium, driven by Playwright), offline, as a reader.

Every page is visited at desktop (1366x900) and phone (390x844) width, each
time in a fresh browser profile (a first visit, nothing cached), in light mode,
then read again after the reader's switch to dark mode (the theme's own button);
one chapter at each width is also opened in dark mode on its first visit, and
must read as the switched one does. Every page loads with no console error and no request leaving
localhost, every image loads, the math is typeset without errors, solutions
stay hidden (code and answer) until clicked, the sidebar buttons work at both
widths, nothing scrolls sideways on a phone, figures are sharp and described,
the chapter numbers and the citations read alike everywhere, and a first visit
stays light. A screenshot of each chapter's first screen at every width and
mode lands in _build/screenshots/; `make screenshots` takes whole pages (a
full page of a long chapter takes seconds to encode, so the test does not).
"""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import urllib.parse

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from screenshots import LOAD_ALL_IMAGES_JS, MODES  # noqa: E402  (the modes make screenshots uses too)

CHROMIUM_ARGS = [  # no background traffic of Chromium's own: only the page's requests remain
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
QUIET_S = 0.1  # a first visit has fetched all it will once no request has been in flight this long
FIRST_VISIT_BYTES = 1_500_000  # transferred by a first visit of a chapter page (nothing cached; text gzipped)
SITE_BYTES = 20_000_000  # the whole of _build/html (15.2 MB measured with 15 chapters)
MIN_PIXEL_RATIO = 1.5  # a figure's natural width over its drawn width on desktop
IMAGE_PATH = re.compile(r"^\S*\.(png|jpe?g|gif|svg|webp)$|^\S*/\S*$", re.I)  # a file name or path, not words

# One evaluation per page: what a reader would see, measured in the page.
SURVEY_JS = r"""() => {
  const article = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
  const visible = (el) => el.checkVisibility();
  const vw = document.documentElement.clientWidth;
  const images = Array.from(article.querySelectorAll("img")).map((img) => {
    const figure = img.closest("figure");
    const caption = figure && figure.querySelector("figcaption");
    return {src: img.getAttribute("src"), alt: img.getAttribute("alt"), complete: img.complete,
            natural: img.naturalWidth, drawn: img.getBoundingClientRect().width,
            own: parseFloat(img.style.width) || null,  // the size myst-nb gives it (the figure's inches at 100 dpi)
            caption: caption ? caption.innerText.trim() : null};
  });
  // Text a reader reads, outside code, outputs' <pre> and typeset math.
  const skip = "pre, code, mjx-container, script, style, textarea, .highlight";
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  const prose = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.parentElement.closest(skip) && visible(n.parentElement)) prose.push(n.textContent);
  }
  const overflowing = [], unboxed = new Set();
  for (const el of article.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || (r.right <= vw + 1 && r.left >= -1)) continue;
    // Allowed only inside a box of the article's own that scrolls sideways and itself fits the
    // screen; the theme's containers clip what overflows them (hidden text), which is no excuse.
    let boxed = false;
    for (let a = el.parentElement; a && a !== article; a = a.parentElement) {
      const style = getComputedStyle(a);
      const ar = a.getBoundingClientRect();
      if ((style.overflowX === "auto" || style.overflowX === "scroll") && style.display !== "inline" &&
          ar.right <= vw + 1 && ar.left >= -1) {
        boxed = true;
        break;
      }
    }
    if (boxed) continue;
    const inner = el.parentElement && unboxed.has(el.parentElement);
    unboxed.add(el);
    if (!inner) overflowing.push(`${el.tagName.toLowerCase()}.${el.className} ` +  // the outermost only
        `(${Math.round(r.width)} px): ${(el.innerText || el.textContent || "").replace(/\s+/g, " ").slice(0, 60)}`);
  }
  const solutions = Array.from(document.querySelectorAll(".cell.tag_solution")).map((cell) => {
    const outputs = Array.from(cell.querySelectorAll(".cell_output > *"));
    return {hasOutput: outputs.length > 0,
            inputVisible: Array.from(cell.querySelectorAll(".cell_input")).some(visible),
            outputVisible: outputs.some(visible)};
  });
  const texts = (selector) => Array.from(document.querySelectorAll(selector)).map((x) => x.innerText.trim());
  const hrefs = (selector) => Array.from(document.querySelectorAll(selector)).map((a) => a.href);
  return {
    images, solutions, overflowing,
    citedAs: texts(".bibtex-citation a"),  // in-text citations; the labels and entries of the reference list:
    referenceLabels: texts(".citation .label"),
    referenceEntries: Array.from(document.querySelectorAll(".citation")).map((x) => x.innerText),
    arxivLinks: document.querySelectorAll(".citation a[href^='https://arxiv.org/abs/']").length,
    colabLinks: hrefs("a[href*='colab.research.google.com']"), downloads: hrefs("a[href$='.ipynb']"),
    sidebar: Array.from(document.querySelectorAll("#pst-primary-sidebar nav.bd-links a.reference.internal"))
      .map((a) => [a.getAttribute("href"), a.innerText.trim()]),
    pageWidth: document.documentElement.scrollWidth, viewport: vw, theme: document.documentElement.dataset.theme,
    prose: prose.join(" "),
    math: document.querySelectorAll(".math").length,
    typeset: document.querySelectorAll("mjx-container").length,
    mathErrors: Array.from(document.querySelectorAll("mjx-merror")).map((e) => e.getAttribute("data-mjx-error") || ""),
    mathText: Array.from(document.querySelectorAll("mjx-assistive-mml")).map((e) => e.textContent),
  };
}"""


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
    """Serves the site as a static host does (GitHub Pages, Read the Docs): text gzip-compressed."""

    COMPRESSED = {".html", ".css", ".js", ".json", ".svg", ".txt", ".ipynb"}
    cache: dict = {}

    def do_GET(self):
        path = pathlib.Path(self.translate_path(self.path))
        if "gzip" not in self.headers.get("Accept-Encoding", "") or path.suffix not in self.COMPRESSED or not path.is_file():
            return super().do_GET()
        if path not in self.cache:
            self.cache[path] = gzip.compress(path.read_bytes(), 6)
        body = self.cache[path]
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
    """One fresh browser profile and page that records every request, its bytes, and every error."""

    def __init__(self, browser, base: str, mode: str = "desktop-light"):
        (width, height), colour = MODES[mode]
        phone = width < 600
        self.base = base
        self.external, self.errors, self.failed = [], [], []
        self.bytes = 0
        self.context = browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=colour,
            is_mobile=phone, has_touch=phone, device_scale_factor=1,
        )
        # The theme keeps the reader's choice of mode in localStorage; a first visit in dark mode.
        self.context.add_init_script(f"localStorage.setItem('mode', '{colour}');")
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.in_flight = set()  # the requests not yet answered: settle waits for none for QUIET_S
        self.page.on("request", lambda r: self.in_flight.add(r))
        self.page.on("requestfailed", self._failed)
        self.page.on("requestfinished", self._count)

    def _route(self, route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def _failed(self, request):
        self.in_flight.discard(request)
        self.failed.append(f"{request.url} ({request.failure})")

    def _count(self, request):
        self.in_flight.discard(request)
        sizes = request.sizes()
        self.bytes += sizes["responseBodySize"] + sizes["responseHeadersSize"]

    def open(self, path: str, settle: bool = False):
        self.page.goto(self.base + path, wait_until="load")
        if path == "index.html":  # the root redirects to chapter 0
            self.page.wait_for_url("**/chapters/00_welcome.html")
            self.page.wait_for_load_state("load")
        # MathJax typesets after load; wait for it where the page loads it, then for its fonts.
        self.page.evaluate("() => window.MathJax?.startup?.promise")
        self.page.evaluate("() => document.fonts.ready.then(() => true)")
        if settle:  # everything a first visit fetches, lazy fonts and images included
            self.settle()
        return self.page

    def settle(self, limit_s: float = 15.0) -> None:
        """Waits until no request has been in flight for QUIET_S seconds.

        Playwright's "networkidle" waits for 500 ms of quiet; on every page of the site the bytes
        counted after 100 ms of quiet were those counted after networkidle and one more second
        (2026-12-04), and the shorter wait saves about 0.4 s per page.
        """
        start = quiet_since = time.perf_counter()
        while time.perf_counter() - quiet_since < QUIET_S:
            self.page.wait_for_timeout(20)  # lets Playwright deliver the request events
            if self.in_flight:
                quiet_since = time.perf_counter()
            assert time.perf_counter() - start < limit_s, f"requests still in flight: {self.in_flight}"

    def close(self):
        self.context.close()


def pages(html: pathlib.Path) -> list[str]:
    return sorted(
        p.relative_to(html).as_posix()
        for p in html.rglob("*.html")
        if not p.relative_to(html).parts[0].startswith("_")
    )


def toc_entries() -> list[dict]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    if "parts" in toc:
        return [c for part in toc["parts"] for c in part["chapters"]]
    return toc["chapters"]


DARK_FIRST_VISIT = "chapters/13_fast_attention.html"  # the longest page also boots in dark mode
SWITCHED = " switched"  # survey[mode + SWITCHED, path]: DARK_FIRST_VISIT read after the switch, to compare


@pytest.fixture(scope="module")
def survey(site, browser):
    """Every page in every mode: {(mode, path): measurements}.

    A page is opened once per width, in light mode on a first visit, and measured; then the
    theme's switch turns it dark and it is measured again, which costs a fraction of a second
    where a second first visit costs about three. DARK_FIRST_VISIT's dark figures come from a
    first visit in dark mode instead, and its switched ones are kept beside them.
    """
    html, base = site
    out = html.parent / "screenshots"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    results = {}
    for light in (m for m in MODES if m.endswith("-light")):
        dark = light.replace("-light", "-dark")
        for path in pages(html):
            visit = Visit(browser, base, light)
            try:
                page = visit.open(path, settle=light == "desktop-light")
                first_visit = visit.bytes  # figures below the first screen wait for the reader to scroll
                results[light, path] = read_page(page, visit, path, out, light)
                results[light, path]["bytes"] = first_visit
                switch_mode(page, "dark")
                if path == DARK_FIRST_VISIT:  # kept beside its dark first visit, below
                    results[dark + SWITCHED, path] = read_page(page, visit, path)
                else:
                    results[dark, path] = read_page(page, visit, path, out, dark)
                if light == "desktop-light":  # last, as it changes the page: back to light, the reader
                    switch_mode(page, "light")  # opens each solution
                    results[light, path]["afterClick"] = open_solutions(page)
            finally:
                visit.close()
        visit = Visit(browser, base, dark)
        try:
            page = visit.open(DARK_FIRST_VISIT)
            results[dark, DARK_FIRST_VISIT] = read_page(page, visit, DARK_FIRST_VISIT, out, dark)
        finally:
            visit.close()
    return results


def read_page(page, visit, path: str, out: pathlib.Path | None = None, mode: str | None = None) -> dict:
    """SURVEY_JS's measurements once every image has loaded, with the visit's requests and errors so far;
    with `out`, a chapter's first screen is saved there as NAME-MODE.png."""
    page.evaluate(LOAD_ALL_IMAGES_JS)
    data = page.evaluate(SURVEY_JS)
    data.update(external=list(visit.external), errors=visit.errors + visit.failed)
    if out is not None and path.startswith("chapters/"):
        page.screenshot(path=str(out / f"{pathlib.Path(path).stem}-{mode}.png"))  # the first screen
    return data


def switch_mode(page, colour: str) -> None:
    """The theme's own switch to `colour` ("light" or "dark"), in place: the system asks for that colour,
    and one click on the theme's button, which from the other colour steps to the system's, sets it.

    The click is dispatched to the button directly: on a phone it sits in the closed menu.
    """
    page.emulate_media(color_scheme=colour)
    page.locator(".theme-switch-button").first.dispatch_event("click")
    page.wait_for_function(f"() => document.documentElement.dataset.theme === '{colour}'")


def open_solutions(page) -> list[dict]:
    """Clicks each solution's toggle; per solution, whether its code and each of its outputs then show."""
    opened = []
    cells = page.locator(".cell.tag_solution")
    for i in range(cells.count()):
        cell = cells.nth(i)
        cell.locator("summary").first.click()
        cell.locator(".cell_input").first.wait_for(state="visible")
        outputs = cell.locator(".cell_output > *")
        opened.append({"code": cell.locator(".cell_input").first.inner_text(),
                       "outputsShown": [outputs.nth(j).is_visible() for j in range(outputs.count())]})
    return opened


def chapter_pages(survey, mode="desktop-light"):
    return {path: data for (m, path), data in survey.items() if m == mode and path.startswith("chapters/")}


def test_every_page_reads_offline(survey):
    pages_seen = {path for _, path in survey}
    assert len(pages_seen) >= 10
    for (mode, path), data in survey.items():
        assert data["external"] == [], f"{mode} {path}: requests that left localhost: {data['external']}"
        assert data["errors"] == [], f"{mode} {path}: {data['errors']}"
        broken = [i["src"] for i in data["images"] if not (i["complete"] and i["natural"] > 0)]
        assert not broken, f"{mode} {path}: images that did not load: {broken}"
        assert data["typeset"] >= data["math"], f"{mode} {path}: {data['math']} math elements, {data['typeset']} typeset"
    assert sum(d["typeset"] for d in survey.values()) > 0 and sum(len(d["images"]) for d in survey.values()) > 0


def test_switched_to_dark_reads_as_a_dark_first_visit(survey):
    """The survey reads most pages dark after the theme's switch; on DARK_FIRST_VISIT both ways agree."""
    for (mode, path), data in survey.items():
        assert data["theme"] == mode.split("-")[1].split()[0], f"{mode} {path}: the page is {data['theme']}"
    for dark in (m for m in MODES if m.endswith("-dark")):
        booted, switched = survey[dark, DARK_FIRST_VISIT], survey[dark + SWITCHED, DARK_FIRST_VISIT]
        for key in ("overflowing", "solutions", "pageWidth", "typeset", "mathErrors", "prose"):
            assert booted[key] == switched[key], f"{dark} {DARK_FIRST_VISIT}: {key} differs after the switch"
        drawn = lambda data: [(i["src"], round(i["drawn"]), i["complete"]) for i in data["images"]]  # noqa: E731
        assert drawn(booted) == drawn(switched), f"{dark}: the figures differ after the switch"


def test_screenshots_of_every_chapter(survey, site):
    html, _ = site
    shots = html.parent / "screenshots"
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        for mode in MODES:
            shot = shots / f"{notebook.stem}-{mode}.png"
            assert shot.exists() and shot.stat().st_size > 10_000, shot


def test_solutions_hidden_whole_until_clicked(survey):
    """Before the click neither a solution's code nor its printed answer shows; after it both do."""
    total, hidden, shown = 0, 0, []
    for (mode, path), data in survey.items():
        for i, cell in enumerate(data["solutions"]):
            if mode == "desktop-light" and cell["hasOutput"]:
                total += 1
                hidden += not cell["outputVisible"]
            if cell["inputVisible"] or cell["outputVisible"]:
                shown.append(f"{mode} {path}: solution {i + 1}'s " + ("answer" if cell["outputVisible"] else "code"))
    print(f"solution outputs hidden: {hidden}/{total}")
    assert total > 0
    assert not shown, "shown before the click (tools/notebooks.py tags solutions hide-cell):\n" + "\n".join(shown)
    opened = 0
    for path, data in chapter_pages(survey).items():
        assert len(data["afterClick"]) == len(data["solutions"]), path
        for i, cell in enumerate(data["afterClick"]):
            assert "assert" in cell["code"], f"{path}: solution {i + 1} shows no code after the click"
            assert all(cell["outputsShown"]), f"{path}: solution {i + 1}'s answer is still hidden after the click"
            opened += 1
    assert opened == sum(len(d["solutions"]) for d in chapter_pages(survey).values()) > 0


def test_phone_menu_buttons_open_the_sidebars(site, browser):
    html, base = site
    visit = Visit(browser, base, "phone-light")
    titles = [c["file"].split("/")[-1] for c in toc_entries()]
    try:
        page = visit.open("chapters/03_masking.html")
        page.locator("button.primary-toggle:visible").first.tap()
        menu = page.locator("#pst-primary-sidebar-modal")
        menu.locator("a.reference.internal").first.wait_for(state="visible", timeout=5000)
        links = menu.locator("a.reference.internal:visible").evaluate_all("xs => xs.map(a => a.href)")
        assert all(any(t in link for link in links) for t in titles), f"the chapter list shows {links}"
        page.keyboard.press("Escape")
        menu.wait_for(state="hidden")
        page.locator("button.secondary-toggle:visible").first.tap()
        contents = page.locator("#pst-secondary-sidebar-modal")
        contents.locator("nav.page-toc a").first.wait_for(state="visible", timeout=5000)
        assert contents.locator("nav.page-toc a:visible").count() >= 3, "the section list of the page"
    finally:
        visit.close()
    assert visit.errors == [] and visit.external == []


def test_desktop_button_collapses_the_sidebar(site, browser):
    html, base = site
    visit = Visit(browser, base, "desktop-light")
    try:
        page = visit.open("chapters/03_masking.html")
        sidebar = page.locator("#pst-primary-sidebar")
        assert sidebar.is_visible()
        page.locator("button.primary-toggle:visible").first.click()
        sidebar.wait_for(state="hidden", timeout=5000)
        page.locator("button.primary-toggle:visible").first.click()
        sidebar.wait_for(state="visible", timeout=5000)
    finally:
        visit.close()
    assert visit.errors == []


def test_cell_tables_render_as_tables(survey):
    for (mode, path), data in survey.items():
        raw = re.findall(r".{0,40}\|\s*:?-{3,}.{0,20}", data["prose"])
        assert not raw, f"{mode} {path}: a Markdown table shows as text: {raw[:3]}"


def test_math_is_typeset_cleanly(site, survey):
    html, _ = site
    problems = []
    for path in pages(html):  # the TeX the page hands MathJax
        text = (html / path).read_text(encoding="utf-8")
        for tex in re.findall(r'class="math[^"]*">(.*?)</(?:span|div)>', text, re.S):
            if "\t" in tex:
                problems.append(f"{path}: a tab inside math (\\t of a \\text in a normal string?): {tex[:80]!r}")
    for (mode, path), data in survey.items():
        if mode != "desktop-light":
            continue
        problems += [f"{path}: MathJax error {e}" for e in data["mathErrors"]]
        problems += [f"{path}: math shows a backslash (an unknown macro?): {t[:80]!r}" for t in data["mathText"] if "\\" in t]
        raw = re.findall(r"\$[^$\s][^$]{0,80}\$|\\\(|\\\[", data["prose"])
        problems += [f"{path}: math left as raw text: {r!r}" for r in raw]
    assert not problems, "\n".join(problems)


def test_nothing_scrolls_sideways_on_a_phone(survey):
    problems = []
    for (mode, path), data in survey.items():
        if not mode.startswith("phone"):
            continue
        problems += [f"{mode} {path}: wider than the screen: {e}" for e in data["overflowing"]]
        if data["pageWidth"] > data["viewport"]:
            problems.append(f"{mode} {path}: the page is {data['pageWidth']} px wide")
    print(f"elements overflowing at 390 px: {len(problems)}")
    assert not problems, "\n".join(problems)


def test_figures_are_sharp(survey):
    ratios, problems = [], []
    for path, data in chapter_pages(survey).items():
        for image in data["images"]:
            ratio = image["natural"] / image["drawn"]
            ratios.append(ratio)
            if ratio < MIN_PIXEL_RATIO:
                problems.append(f"{path}: {image['src'][-20:]} has {image['natural']} px drawn at {image['drawn']:.0f} px")
            if image["own"] and image["drawn"] < image["own"] - 1:  # shrunk: its text is smaller than drawn
                problems.append(f"{path}: {image['src'][-20:]} is {image['own']:.0f} px wide, shrunk to the column's "
                                f"{image['drawn']:.0f} px: draw it at most 7 inches wide (mha.plot.COLUMN_INCHES)")
    assert ratios
    print(f"smallest figure pixel ratio: {min(ratios):.2f}")
    assert not problems, "store figures at twice their size (retina) and at most the column wide:\n" + "\n".join(problems)


def test_figures_have_alt_text_and_a_caption(survey):
    problems = []
    for path, data in chapter_pages(survey).items():
        for image in data["images"]:
            alt = (image["alt"] or "").strip()
            if not alt or IMAGE_PATH.search(alt):
                problems.append(f"{path}: {image['src'][-20:]} has alt text {alt[-30:]!r}")
            if not image["caption"]:
                problems.append(f"{path}: {image['src'][-20:]} has no caption")
    assert not problems, "give each figure cell mystnb image.alt and figure.caption:\n" + "\n".join(problems)


def test_sidebar_numbers_chapters_as_the_prose_does(survey):
    items = survey["desktop-light", "chapters/03_masking.html"]["sidebar"]
    numbered = 0
    root = yaml.safe_load((ROOT / "_toc.yml").read_text())["root"].split("/")[-1]
    for href, text in items:
        stem = (href.split("#")[0] or "03_masking.html").split("/")[-1].removesuffix(".html")  # "#": this page
        match = re.match(r"(\d\d)_", stem)
        if match and stem == root:
            assert not re.match(r"\d+\.", text), f"the welcome page {stem} is chapter 0, unnumbered: {text!r}"
        elif match:
            assert text.startswith(f"{int(match.group(1))}. "), f"{stem} is listed as {text!r}"
            numbered += 1
        else:
            assert not re.match(r"\d+\.", text), f"{stem} should have no number: {text!r}"
    assert numbered == len([c for c in toc_entries() if re.search(r"/\d\d_", c["file"])])


def test_citations_in_one_style_with_arxiv_links(survey):
    cited = {c for data in chapter_pages(survey).values() for c in data["citedAs"]}
    references = survey["desktop-light", "chapters/references.html"]
    labels, entries, arxiv = references["referenceLabels"], references["referenceEntries"], references["arxivLinks"]
    author_year = re.compile(r"^\[[^\]]+, \d{4}\]$")
    assert labels and all(author_year.match(x) for x in labels), labels
    assert cited and all(author_year.match(f"[{c}]") for c in cited), f"in-text citations read {sorted(cited)}"
    missing = {f"[{c}]" for c in cited} - set(labels)
    assert not missing, f"cited in the text as {sorted(missing)}, not so in the list {labels}"
    assert arxiv == sum("arXiv:" in e for e in entries) > 0, "every arXiv id is a link"
    assert not any("$" in e for e in entries), "raw TeX in the reference list"


def test_first_visit_and_site_weight(site, survey):
    html, _ = site
    heaviest = max(chapter_pages(survey).items(), key=lambda kv: kv[1]["bytes"])
    total = sum(p.stat().st_size for p in html.rglob("*") if p.is_file())
    print(f"heaviest first visit: {heaviest[0]} {heaviest[1]['bytes']:,} bytes transferred (text gzip-compressed "
          f"as a static host serves it); _build/html {total:,} bytes")
    for path, data in chapter_pages(survey).items():
        assert data["bytes"] <= FIRST_VISIT_BYTES, f"{path}: a first visit transfers {data['bytes']:,} bytes"
    assert total <= SITE_BYTES, f"_build/html holds {total:,} bytes"


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


def test_colab_links_point_at_each_chapter_on_main(survey):
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    slug = urllib.parse.urlsplit(repo["url"]).path.strip("/")
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        data = survey["desktop-light", f"chapters/{notebook.stem}.html"]
        expected = f"https://colab.research.google.com/github/{slug}/blob/{repo['branch']}/chapters/{notebook.name}"
        assert data["colabLinks"] == [expected], f"{notebook.name}: {data['colabLinks']}"
        assert any(d.endswith(f"_sources/chapters/{notebook.name}") for d in data["downloads"]), data["downloads"]
