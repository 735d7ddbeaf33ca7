"""The rendered site: no outside requests, and every page reads right in a real (headless) browser.

The site is built into a temporary lab root from the repository's notebooks: the tour runs in
quick mode (so a page with real outputs and figures is covered) and every other notebook is
rendered from its source, so a new notebook is checked the day it lands. The same checks then
run on the checkout's own build/site (what `make quick`, `make reproduce` or `make html` last
wrote) and on the published docs/ when they exist. Chromium loads each page from a local server:
zero console errors, every image with a non-zero natural size, every internal link (and the cell
it points to) resolving, and in the text a reader sees no raw Markdown (pipes, asterisks), no
progress bar and no table printed as text. Screenshots of the landing page, studies 03 and 08 and
the refresh sheet go to build/site-screenshots/.
"""

from __future__ import annotations

import functools
import html
import http.server
import re
import shutil
import socket
import threading
import urllib.parse

import pytest

from labkit.core import paths
from labkit.lab import reproduce, site, sources

REPO_BUILD = paths.build_dir()  # resolved before LABKIT_ROOT is redirected
REPO_ROOT = paths.root()
REPO_NOTEBOOKS = paths.notebooks_dir()
SHOTS = {"index.html": "landing", "refresh.html": "refresh",
         "notebooks/03_quantization_error.html": "study-03", "notebooks/08_runtime_benchmark.html": "study-08",
         "notebooks/00_tour.html": "study-00"}

# What a reader must never see outside code: Markdown left unrendered, a progress bar's line.
RAW_MARKDOWN = [
    re.compile(r"^\s*\|(?:[^|\n]*\|){2,}\s*$", re.M),  # a pipe-table row
    re.compile(r"\*\*\S[^*\n]{0,80}?\*\*"),  # **bold**
    re.compile(r"(?<![\w*\\])\*(?![\s*])[^*\n]{1,80}?(?<![\s*])\*(?![\w*])"),  # *emphasis*
    re.compile(r"^\s*\* \S", re.M),  # a "* " bullet
]
PROGRESS_BAR = re.compile(r"\d+%\|[^|\n]{0,40}\||\b\d+/\d+ \[\d\d:\d\d<|it/s\]")
# A column gap: two or more spaces between two words.
_GAP = re.compile(r"\S {2,}\S")


def text_tables(text: str) -> list[str]:
    """Tables printed as text (pandas' to_string, a printed DataFrame or Series): three or more
    consecutive lines of one length (to_string pads every row to the table's width), each with
    a column gap."""
    found, run = [], []
    for line in [*text.splitlines(), ""]:
        if _GAP.search(line) and (not run or len(line) == len(run[-1])):
            run.append(line)
            continue
        if len(run) >= 3:
            found.append("\n".join(run))
        run = [line] if _GAP.search(line) else []
    return found

# JavaScript: the text a reader sees, code inputs left out; and each output <pre>'s text.
_READER_TEXT = """
var body = document.body.cloneNode(true);
body.querySelectorAll('.jp-InputArea, script, style, code').forEach(function (e) { e.remove(); });
return [body.innerText,
        Array.from(document.querySelectorAll('.jp-OutputArea-output pre')).map(function (p) { return p.innerText; })];
"""


def test_external_resources_detects_requests_not_links():
    assert site.external_resources('<script src="https://cdn.example/x.js"></script>')
    assert site.external_resources('<img src="//cdn.example/a.png">')
    assert site.external_resources('<link rel="stylesheet" href="https://x/y.css">')
    assert site.external_resources("body{background:url('https://x/y.png')}")
    assert not site.external_resources('<a href="https://arxiv.org/abs/2205.14135">paper</a>')
    assert not site.external_resources('<img src="figures/a.png">')


def test_reader_checks_catch_what_they_should_and_only_that():
    assert any(p.search("| runtime | dtype | size |") for p in RAW_MARKDOWN)
    assert any(p.search("Apple's *On Device Llama*") for p in RAW_MARKDOWN)
    assert any(p.search("a **bold** claim") for p in RAW_MARKDOWN)
    assert any(p.search("* Converts with torch") for p in RAW_MARKDOWN)
    assert not any(p.search("2 * 3 * 4 = 24; x*y; max |dlogit| 1e-5") for p in RAW_MARKDOWN)
    assert PROGRESS_BAR.search("prompt lengths:  50%|█████     | 1/2 [00:00<00:00,  2.34it/s]")
    assert not PROGRESS_BAR.search("decode at 0.42 of the bandwidth limit (100% of tokens equal)")
    import pandas as pd

    frame = pd.DataFrame({"runtime": ["torch-eager", "onnx"], "tok/s": [1.5, 22.25]})
    assert text_tables("before\n" + frame.to_string() + "\nafter") == [frame.to_string()]
    series = pd.Series({"Llama-2-7b": 3.55, "phi-2": 3.56, "tiny-llama": 3.5})
    assert text_tables(series.to_string()) == [series.to_string()]
    assert not text_tables("1. decoder: 0 weight on later tokens\n2. encoder: all of them\n")
    assert not text_tables("skipped: vllm  - WARNING: one\n  - WARNING: a longer line\n  -> no network\n")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    mp = pytest.MonkeyPatch()
    mp.setenv("LABKIT_ROOT", str(root))
    try:
        run = reproduce.run_notebook(REPO_NOTEBOOKS / "00_tour.ipynb", quick=True, timeout=600,
                                     kernel=reproduce.ensure_kernel())
        assert run.ok, run.error
        reproduce.write_summary([run], quick=True)
        yield site.build_site(notebooks_dir=REPO_NOTEBOOKS)
    finally:
        mp.undo()


@pytest.mark.slow
def test_site_has_every_notebook_and_no_outside_requests(built_site):
    names = {p.stem for p in (built_site / "notebooks").glob("*.html")}
    assert names == {p.stem for p in reproduce.discover(notebooks_dir=REPO_NOTEBOOKS)}
    for page in built_site.rglob("*.html"):
        assert not site.external_resources(page.read_text()), page
    index = (built_site / "index.html").read_text()
    assert "00_tour-copy-bandwidth.png" in index  # the tour's key figure
    assert "run on" in index and "not executed in this build" in index
    assert (built_site / "refresh.html").is_file() and (built_site / sources.SOURCES_FILE).is_file()
    assert (built_site / "notebooks" / "00_tour.ipynb").is_file()
    for path in [built_site, *built_site.rglob("*")]:  # readable by a web server's user
        assert path.stat().st_mode & 0o004, f"{path}: not world-readable"


def test_docs_were_built_from_the_committed_notebooks_and_results(monkeypatch):
    """docs/ (the published site) records the sha256 of every source; each must still match."""
    # the built_site fixture points LABKIT_ROOT at a scratch lab; sources are relative to the repo
    monkeypatch.setenv("LABKIT_ROOT", str(REPO_ROOT))
    docs = REPO_ROOT / "docs"
    if not (docs / "index.html").is_file():
        pytest.skip("docs/ not published yet: after a clean full run, make publish, then commit docs/")
    problems = sources.verify(docs, REPO_ROOT, reproduce.discover(notebooks_dir=REPO_NOTEBOOKS),
                              require_full=True)
    assert not problems, "docs/ is stale; rebuild it with make publish:\n" + "\n".join(problems)


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module", params=["fresh", "repo", "docs"])
def checked_site(request, built_site):
    """The site built above ("fresh"); the checkout's own build/site ("repo": what `make quick`,
    `make reproduce` or `make html` last wrote, every executed study in it); docs/ ("docs")."""
    if request.param == "fresh":
        return request.param, built_site
    folder = REPO_BUILD / "site" if request.param == "repo" else REPO_ROOT / "docs"
    if not (folder / "index.html").is_file():
        pytest.skip(f"{folder} not built yet (make quick or make html; make publish for docs/)")
    return request.param, folder


@pytest.fixture(scope="module")
def served(checked_site):
    _, folder = checked_site

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output readable
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver():
    found = _chromium()
    if found is None:
        pytest.skip("needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
                    "chromium-driver; macOS: brew install --cask chromium chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-default-apps", "--disable-sync", "--no-first-run",
                 "--disable-features=MediaRouter,OptimizationHints", "--window-size=1280,1600"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield d
    d.quit()


def _broken_links(driver, served: str, folder) -> list[str]:
    """Internal links whose page, or whose #cell-id anchor on it, does not exist."""
    broken = []
    base = urllib.parse.urlparse(served).path
    for link in driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"):
        parsed = urllib.parse.urlparse(link)
        if not link.startswith(served) or not parsed.path.endswith((".html", ".ipynb")):
            continue  # outside links are plain anchors (papers, docs), not requests
        target = folder / urllib.parse.unquote(parsed.path[len(base):])
        if not target.exists():
            broken.append(link)
        elif parsed.fragment and target.suffix == ".html":
            if not {parsed.fragment, urllib.parse.unquote(parsed.fragment)} & _ids(target):
                broken.append(link)
    return broken


@functools.cache
def _ids(page) -> set[str]:
    """The element ids of a page (nbconvert writes heading ids percent-encoded, as their links)."""
    found = re.findall(r"""\bid\s*=\s*(?:"([^"]*)"|'([^']*)')""", page.read_text(encoding="utf-8"))
    return {html.unescape(a or b) for a, b in found}


def _reader_problems(driver) -> list[str]:
    text, pres = driver.execute_script(_READER_TEXT)
    found = [f"raw Markdown {m.group(0)!r}" for p in RAW_MARKDOWN for m in p.finditer(text)]
    found += [f"progress bar {m.group(0)!r}" for m in PROGRESS_BAR.finditer(text)]
    found += [f"table printed as text:\n{t}" for pre in pres for t in text_tables(pre)]
    return found


@pytest.mark.slow
def test_pages_in_headless_chromium(checked_site, served, driver):
    kind, folder = checked_site
    shots = REPO_BUILD / "site-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))
    problems = []
    for rel in pages:
        driver.get(urllib.parse.urljoin(served, rel))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.src.slice(0, 80), i.naturalWidth, i.naturalHeight]);"
        )
        problems += [f"{rel}: console error {e}" for e in errors]
        problems += [f"{rel}: image without a natural size {s}" for s in sizes if not (s[1] > 0 and s[2] > 0)]
        problems += [f"{rel}: broken internal link {link}" for link in _broken_links(driver, served, folder)]
        problems += [f"{rel}: {p}" for p in _reader_problems(driver)]
        if rel in SHOTS:
            driver.save_screenshot(str(shots / f"{kind}-{SHOTS[rel]}.png"))
        if rel == "notebooks/00_tour.html":
            toggles = driver.find_elements("css selector", ".lab-toggle")
            assert toggles, "code cells should be collapsible"
            toggles[0].click()
    assert {"index.html", "refresh.html", "notebooks/00_tour.html"} <= set(pages)
    assert not problems, "\n".join(problems)
