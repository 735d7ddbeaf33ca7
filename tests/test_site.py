"""The rendered site: no outside requests, and every page works in a real (headless) browser.

The site is built into a temporary lab root from the repository's notebooks: the tour runs in
quick mode (so a page with real outputs and figures is covered) and every other notebook is
rendered from its source, so a new notebook is checked the day it lands. Chromium loads each
page from a local server: zero console errors, every image with a non-zero natural size, every
internal link resolving. Screenshots of the landing page and one study go to build/.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
import urllib.parse

import pytest

from labkit.core import paths
from labkit.lab import reproduce, site

REPO_BUILD = paths.build_dir()  # resolved before LABKIT_ROOT is redirected
REPO_NOTEBOOKS = paths.notebooks_dir()


def test_external_resources_detects_requests_not_links():
    assert site.external_resources('<script src="https://cdn.example/x.js"></script>')
    assert site.external_resources('<img src="//cdn.example/a.png">')
    assert site.external_resources('<link rel="stylesheet" href="https://x/y.css">')
    assert site.external_resources("body{background:url('https://x/y.png')}")
    assert not site.external_resources('<a href="https://arxiv.org/abs/2205.14135">paper</a>')
    assert not site.external_resources('<img src="figures/a.png">')


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
    for path in [built_site, *built_site.rglob("*")]:  # readable by a web server's user
        assert path.stat().st_mode & 0o004, f"{path}: not world-readable"


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module", params=["fresh", "repo"])
def checked_site(request, built_site):
    """The site built above ("fresh"), then the checkout's own build/site ("repo": what
    `make reproduce` or `make html` last wrote, every executed study in it)."""
    if request.param == "fresh":
        return built_site
    repo_site = REPO_BUILD / "site"
    if not (repo_site / "index.html").is_file():
        pytest.skip(f"{repo_site} not built yet: run make reproduce (or make html) first")
    return repo_site


@pytest.fixture(scope="module")
def served(checked_site):
    built_site = checked_site

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output readable
            pass

    handler = functools.partial(Quiet, directory=str(built_site))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_pages_in_headless_chromium(checked_site, served):
    built_site = checked_site
    prefix = "" if built_site != REPO_BUILD / "site" else "repo-"
    found = _chromium()
    if found is None:
        pytest.skip("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-default-apps", "--disable-sync", "--no-first-run",
                 "--disable-features=MediaRouter,OptimizationHints", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    shots = REPO_BUILD / "site-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        pages = sorted(p.relative_to(built_site).as_posix() for p in built_site.rglob("*.html"))
        for rel in pages:
            url = urllib.parse.urljoin(served, rel)
            driver.get(url)
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{rel}: console errors {errors}"
            sizes = driver.execute_script(
                "return Array.from(document.images).map(i => [i.src.slice(0, 80), i.naturalWidth, i.naturalHeight]);"
            )
            broken = [s for s in sizes if not (s[1] > 0 and s[2] > 0)]
            assert not broken, f"{rel}: images without a natural size: {broken}"
            links = driver.execute_script(
                "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"
            )
            for link in links:
                parsed = urllib.parse.urlparse(link)
                if not link.startswith(served) or not parsed.path.endswith(".html"):
                    continue  # outside links are plain anchors (papers, docs), not requests
                target = built_site / urllib.parse.unquote(parsed.path[len(urllib.parse.urlparse(served).path):])
                assert target.exists(), f"{rel}: broken internal link {link}"
            if rel == "index.html":
                driver.save_screenshot(str(shots / f"{prefix}landing.png"))
            if rel == "notebooks/00_tour.html":
                toggles = driver.find_elements("css selector", ".lab-toggle")
                assert toggles, "code cells should be collapsible"
                toggles[0].click()
                driver.save_screenshot(str(shots / f"{prefix}study-00_tour.png"))
        assert "index.html" in pages and "notebooks/00_tour.html" in pages
    finally:
        driver.quit()
