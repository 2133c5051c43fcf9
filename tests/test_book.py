"""The whole book, end to end: every notebook under the tiny profile, the Jupyter Book build with
warnings as errors, then every page opened in headless Chromium: it loads, each chapter's
figures are present and non-empty, and no internal link is broken."""

import functools
import json
import http.server
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import numpy as np
import pytest
import yaml
from PIL import Image

from delving.book import BOOK_DIR, build_html, execute_notebook
from delving.params import notebooks

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--disable-quic", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=4000"]


def toc_pages(book_dir: Path) -> list[str]:
    toc = yaml.safe_load((book_dir / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part["chapters"]]
    return pages


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    root = tmp_path_factory.mktemp("bookbuild")
    book = root / "book"
    shutil.copytree(BOOK_DIR, book, ignore=shutil.ignore_patterns("[0-9][0-9]_*.ipynb", ".*", "_build"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELVING_RESULTS", str(root / "results"))
        for name in notebooks():
            execute_notebook(name, "tiny", output_dir=book, progress=False)
        index = build_html(book, root, warnings_as_errors=True)
    return book, index.parent


def test_every_notebook_runs_through_papermill_under_the_tiny_profile(built_book):
    book, _ = built_book
    for name in notebooks():
        nb = json.loads((book / f"{name}.ipynb").read_text())
        outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"], name


def test_toc_lists_every_notebook():
    pages = toc_pages(BOOK_DIR)
    assert set(notebooks()) <= set(pages), "every notebook is a chapter of the book"


def test_build_links_every_chapter_from_the_index(built_book):
    book, html = built_book
    index = (html / "index.html").read_text()
    for page in toc_pages(book)[1:]:
        assert (html / f"{page}.html").is_file(), page
        assert f'href="{page}.html' in index, f"index links {page}"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])


def _serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _dump_dom(url: str, profile_dir: Path) -> str:
    out = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_every_page_loads_in_chromium_with_figures_and_unbroken_links(built_book, tmp_path):
    book, html = built_book
    server = _serve(html)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        doms = {}
        for page in toc_pages(book):
            dom = _dump_dom(base + f"{page}.html", tmp_path / "chromium")
            parsed = _Page()
            parsed.feed(dom)
            assert "<main" in dom and "bd-article" in dom, f"{page} did not render the book layout"
            doms[page] = parsed
        for page, parsed in doms.items():
            figures = [src for src in parsed.images if "_images/" in src]
            if page in notebooks() and page != "09_scorecard":
                assert figures, f"chapter {page} shows no figure"
            for src in figures:
                path = html / unquote(urlparse(urljoin(base + f"{page}.html", src)).path.lstrip("/"))
                assert path.is_file() and path.stat().st_size > 0, (page, src)
                pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
                assert pixels.std() > 1.0, f"{page}: figure {src} is blank"
            for href in parsed.links:
                url, fragment = urldefrag(urljoin(base + f"{page}.html", href))
                if not url.startswith(base):
                    continue
                target = html / unquote(urlparse(url).path.lstrip("/"))
                if target.is_dir():
                    target = target / "index.html"
                assert target.is_file(), f"{page}: broken link {href}"
                if fragment and target.suffix == ".html":
                    ids = _Page()
                    ids.feed(target.read_text())
                    assert fragment in ids.ids, f"{page}: link {href} points at a missing anchor"
    finally:
        server.shutdown()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_first_page_screenshot_is_not_blank(built_book, tmp_path):
    _, html = built_book
    shot = tmp_path / "index.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900",
                    f"--screenshot={shot}", (html / "index.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1280) and pixels.std() > 5
