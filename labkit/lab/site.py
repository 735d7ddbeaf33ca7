"""`make html`: a static site of the executed notebooks that reads like a book, without Python.

Why nbconvert (and not jupyter-book): it is already a Jupyter dependency, renders exactly what
the executed notebook holds (Markdown, HTML tables, figures embedded as data URIs, plain text),
and needs no second configuration tree; the landing page, the refresh sheet and the results
pages are small enough to write here. Streams are shown as JupyterLab shows them: consecutive
outputs merged and carriage returns applied (only a progress bar's final state would remain;
headless runs disable progress bars altogether, see ``labkit.lab.reproduce``).

The site makes no request to any outside host: nbconvert's CDN scripts (require.js, MathJax)
are left out, and `external_resources()` lists anything that would still reach out, which the
build refuses. Links are relative, so the folder works from any web server or static host.
Links to papers in the prose are plain anchors, not requests.

Layout of ``build/site/`` (``docs/`` when published, see :func:`publish`)::

    index.html                      one card per study: question, key figure, claims, machine
    refresh.html                    every asserted claim with its value, by topic (labkit.lab.refresh)
    notebooks/NN_slug.html          the executed notebook: question, answer in numbers, then the body
    notebooks/NN_slug.ipynb         the executed notebook itself (GitHub renders it too)
    notebooks/NN_slug@model.html    the same study run again on a model of notebooks/models.yml
    results/<study>/<machine>.html  every recorded measurement of a study on one machine
    figures/<name>.png              the key figures shown on the landing page
    static/<hash>.css               nbconvert's stylesheets, shared by the notebook pages
    site-sources.json               the sha256 of every file the site was built from (labkit.lab.sources)
"""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.core import paths
from labkit.core.files import atomic_dir, atomic_write_text
from labkit.core.results import machine_label
from labkit.lab import refresh, sources

# Anything that makes the browser fetch from elsewhere: src=, <link href=>, CSS url(), @import.
_EXTERNAL = re.compile(
    r"""(?:\bsrc\s*=\s*["']?|<link\b[^>]*\bhref\s*=\s*["']?|url\(\s*["']?|@import\s+["'])"""
    r"""\s*(?:https?:)?//""",
    re.IGNORECASE,
)
_CDN_TAGS = re.compile(
    r"""<script\b[^>]*\bsrc\s*=\s*["'](?:https?:)?//[^"']*["'][^>]*>\s*</script>"""
    r"""|<link\b[^>]*\bhref\s*=\s*["'](?:https?:)?//[^"']*["'][^>]*/?>""",
    re.IGNORECASE,
)

# nbconvert's stylesheets (JupyterLab's theme, about 260 KB) are the same on every page: each is
# written once into static/ and linked, which keeps the committed docs/ small.
_STYLE_BLOCK = re.compile(r"<style[^>]*>(.*?)</style>", re.DOTALL)
_SHARED_MIN = 2000  # characters: nbconvert's sheets; a page's own small styles stay inline

# No favicon request (a 404 would be a console error): an empty inline icon on every page.
_ICON = '<link rel="icon" href="data:,">'

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header.lab{background:#1d3557;color:#fff;padding:14px 28px}
header.lab a{color:#fff;text-decoration:none;margin-right:18px}
header.lab .meta{color:#dde}
main.lab{max-width:1100px;margin:24px auto;padding:0 24px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:18px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:16px}
.card h2{font-size:1.1em;margin:0 0 8px}
.card img{width:100%;height:auto;border:1px solid #eee}
.meta{color:#555;font-size:.85em}
table.rec{border-collapse:collapse;font-size:.85em;margin-bottom:18px}
table.rec td,table.rec th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.claims{width:100%;table-layout:fixed}
table.claims col.verdict{width:3.5em}
table.claims col.claim{width:40%}
table.claims col.value{width:27%}
table.claims col.where{width:18%}
table.claims td{overflow-wrap:anywhere}
td.ok,.verdict.ok{color:#1a7f37;font-weight:600}
td.fail,.verdict.fail,li.fail{color:#b42318;font-weight:600}
.lab-answers{background:#eef4fb;border:1px solid #c9d8ec;border-radius:8px;padding:4px 18px 10px;margin:12px 0}
.lab-answers h2{font-size:1.15em}
.lab-answers li{margin:3px 0}
.pending{color:#a33}
"""

# Code cells collapsible: a button per input and one to toggle all, no outside script.
_TOGGLE = """
<style>.lab-toggle{font-size:.75em;margin:2px 0 2px 0;cursor:pointer}
.lab-hidden{display:none!important}</style>
<script>
document.addEventListener("DOMContentLoaded", function () {
  var inputs = document.querySelectorAll(".jp-CodeCell .jp-Cell-inputWrapper");
  inputs.forEach(function (el) {
    var b = document.createElement("button");
    b.className = "lab-toggle"; b.textContent = "hide code";
    b.addEventListener("click", function () {
      var hidden = el.classList.toggle("lab-hidden");
      b.textContent = hidden ? "show code" : "hide code";
    });
    el.parentNode.insertBefore(b, el);
  });
  var all = document.getElementById("lab-toggle-all");
  if (all) all.addEventListener("click", function () {
    var hide = all.dataset.state !== "hidden";
    document.querySelectorAll(".lab-toggle").forEach(function (b) {
      var el = b.nextElementSibling;
      el.classList.toggle("lab-hidden", hide);
      b.textContent = hide ? "show code" : "hide code";
    });
    all.dataset.state = hide ? "hidden" : "shown";
    all.textContent = hide ? "show all code" : "hide all code";
  });
});
</script>
"""


@dataclass
class Run:
    """One execution of a notebook as the site shows it (its source when it did not run)."""

    name: str  # 01_kv_cache, or 01_kv_cache@smollm2-135m for a run on another model
    source: Path
    executed: Path | None
    nb: Any
    claims: list[refresh.Found] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.source.stem


@dataclass
class Study:
    """One notebook's card: its own run and its runs on other models."""

    run: Run
    title: str
    question: str
    run_on: str = ""
    run_at: str = ""
    key_figure: str | None = None
    variants: list[Run] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)  # (machine id, label)


def external_resources(text: str) -> list[str]:
    """Snippets of HTML that would make a browser request an outside host (empty means none)."""
    return [text[max(0, m.start() - 40) : m.end() + 60] for m in _EXTERNAL.finditer(text)]


def markdown_html(text: str, *, inline: bool = False) -> str:
    """Markdown as the notebook pages render it (nbconvert's mistune); ``inline`` drops the <p>."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    out = markdown2html_mistune(text).strip()
    if inline and out.startswith("<p>") and out.endswith("</p>") and out.count("<p>") == 1:
        out = out[3:-4]
    return out


def split_intro(source: str) -> tuple[str, str]:
    """A first cell's title and question paragraph (the '**The question.**' one, else the first
    paragraph), and the rest of the cell."""
    paragraphs = [p for p in re.split(r"\n\s*\n", source.strip()) if p.strip()]
    if len(paragraphs) < 2:
        return source.strip(), ""
    asks = [i for i, p in enumerate(paragraphs[1:], 1) if "question" in p.lower()[:40]]
    cut = asks[0] if asks else 1
    head = "\n\n".join(paragraphs[: cut + 1])
    if head.count("```") % 2:  # never cut inside a fenced block
        return source.strip(), ""
    return head, "\n\n".join(paragraphs[cut + 1 :])


def _question(nb: Any) -> tuple[str, str]:
    """Title (first heading) and question paragraph of a notebook, as Markdown."""
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        return "", ""
    head, _ = split_intro(nb.cells[0].source)
    title, _, rest = head.partition("\n")
    question = re.sub(r"^\**\s*(the\s+)?question[.:]?\s*\**\s*", "", rest.strip(), flags=re.IGNORECASE)
    return title.lstrip("#").strip(), question


def _summary() -> dict:
    path = paths.build_dir() / "reproduce-summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _outputs_root(summary: dict) -> Path:
    """Where the run that produced build/notebooks wrote its figures and results."""
    if os.environ.get("LABKIT_OUTPUT_ROOT"):
        return paths.output_root()
    return paths.build_dir() / "quick" if summary.get("quick") else paths.root()


def _nav(depth: int, extra: str = "") -> str:
    up = "../" * depth
    return (f'<header class="lab"><a href="{up}index.html">&larr; all studies</a>'
            f'<a href="{up}refresh.html">refresh sheet</a>{extra}</header>')


def _page(title: str, body: str, depth: int) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title>{_ICON}<style>{_STYLE}</style></head><body>{_nav(depth)}"
            f"<main class='lab'>{body}</main></body></html>")


def _reading_order(nb: Any, claims: list[refresh.Found]) -> None:
    """Open the page with the question, then the answer in numbers, then the rest (in place)."""
    import nbformat

    if not nb.cells or nb.cells[0].cell_type != "markdown":
        return
    head, rest = split_intro(nb.cells[0].source)
    cells = [nbformat.v4.new_markdown_cell(head), nbformat.v4.new_markdown_cell(refresh.answers_html(claims))]
    if rest:
        cells.append(nbformat.v4.new_markdown_cell(rest))
    for i, cell in enumerate(cells):
        cell.id = f"lab-intro-{i}"
    nb.cells = cells + nb.cells[1:]


def _convert(run: Run, run_label: str) -> str:
    """One run's page: nbconvert's lab template, our header, streams merged as JupyterLab shows them."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb = copy.deepcopy(run.nb)
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    if run.executed:
        _reading_order(nb, run.claims)
    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    exporter.widget_renderer_url = ""
    exporter.jupyter_widgets_base_url = ""
    body, _ = exporter.from_notebook_node(nb)
    body = _CDN_TAGS.sub("", body)
    extra = '<button id="lab-toggle-all" data-state="shown">hide all code</button>'
    if run.executed:
        extra += (f'<a href="{html.escape(run.name)}.ipynb" style="margin-left:18px">executed notebook '
                  f'(.ipynb)</a><span class="meta">{html.escape(run_label)}</span>')
    banner = _nav(1, extra)
    if not run.executed:
        banner += (
            '<p class="pending" style="padding:0 28px">Not executed in this build: showing the '
            "notebook's source. Run <code>make reproduce</code> to fill in its outputs.</p>"
        )
    body = body.replace("</head>", f"{_ICON}<style>{_STYLE}</style>{_TOGGLE}</head>", 1)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + banner, body, count=1)


def _results_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{h}</th>" for h in
                   ("metric", "value", "unit", "runtime", "device", "model", "params", "created"))
    cells = "".join(
        "<tr>" + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (r["metric"], f"{r['value']:.6g}", r["unit"], r["runtime"], r["device"],
                      r["model"], json.dumps(r["params"], sort_keys=True), r["created"][:19])
        ) + "</tr>"
        for r in rows
    )
    return f"<table class='rec'><tr>{head}</tr>{cells}</table>"


def machine_labels(results_dir: Path, summary: dict) -> dict[str, str]:
    """Machine id -> a reader's name, from the committed fingerprints and this run's machine."""
    labels = {}
    for fp in sorted((results_dir / "machines").glob("*.json")) if results_dir.exists() else []:
        labels[fp.stem] = machine_label(json.loads(fp.read_text()))
    machine = summary.get("machine") or {}
    if machine.get("machine_id"):
        labels[machine["machine_id"]] = machine_label(machine)
    return labels


def _results_pages(site: Path, results_dir: Path, labels: dict[str, str],
                   used: list[sources.Source]) -> dict[str, list[tuple[str, str]]]:
    """One HTML table per (study, machine); returns study -> [(machine id, label)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    if not results_dir.exists():
        return out
    for fp in sorted((results_dir / "machines").glob("*.json")):
        used.append(sources.source("results", fp))
    for study_dir in sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name != "machines"):
        for jsonl in sorted(study_dir.glob("*.jsonl")):
            machine = jsonl.stem
            label = labels.get(machine, f"{machine} (fingerprint not committed)")
            rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
            body = (f"<h1>{study_dir.name}: results on {html.escape(label)}</h1>"
                    f"<p class='meta'>machine id {machine}; {len(rows)} records from "
                    f"<code>data/results/{study_dir.name}/{jsonl.name}</code>; the notebook: "
                    f"<a href='../../notebooks/{study_dir.name}.html'>{study_dir.name}</a></p>"
                    f"{_results_table(rows)}")
            atomic_write_text(site / "results" / study_dir.name / f"{machine}.html",
                              _page(f"{study_dir.name} on {machine}", body, 2))
            used.append(sources.source("results", jsonl))
            out.setdefault(study_dir.name, []).append((machine, label))
    return out


def _key_figure(stem: str, nb: Any, figures_dir: Path) -> Path | None:
    """The notebook's key figure: metadata labkit.key_figure if set, else its first figure by name."""
    wanted = nb.metadata.get("labkit", {}).get("key_figure")
    if wanted and (figures_dir / f"{wanted}.png").exists():
        return figures_dir / f"{wanted}.png"
    found = sorted(figures_dir.glob(f"{stem}-*.png")) if figures_dir.exists() else []
    return found[0] if found else None


def collect_runs(notebooks_dir: Path | None = None) -> list[tuple[Run, list[Run]]]:
    """Each notebook's own run and its runs on other models (executed copies in build/notebooks)."""
    import nbformat

    from labkit.lab.reproduce import discover, jobs_for

    executed_dir = paths.build_dir() / "notebooks"
    out = []
    for src in discover(notebooks_dir=notebooks_dir):
        runs = []
        for job in jobs_for([src]):  # its own run, then one per model of notebooks/models.yml
            executed = executed_dir / f"{job.name}.ipynb"
            if not executed.is_file():
                if job.model is not None:
                    continue  # a model run that did not happen has no page
                executed = None
            nb = nbformat.read(executed or src, as_version=4)
            runs.append(Run(job.name, src, executed, nb, refresh.collect(nb, job.name) if executed else []))
        out.append((runs[0], runs[1:]))
    return out


def build_site(out_dir: Path | None = None, notebooks_dir: Path | None = None) -> Path:
    """Write the site into ``out_dir`` (default build/site) atomically: a new folder replaces the
    old one only once every page is written."""
    summary = _summary()
    outputs = _outputs_root(summary)
    figures_dir, results_dir = outputs / "figures", outputs / "data" / "results"
    final = out_dir or paths.build_dir() / "site"
    with atomic_dir(final) as site:
        used = _write_site(site, summary, figures_dir, results_dir, notebooks_dir)
        sources.write(site, used, summary)
    return final


def _study(main: Run, variants: list[Run], machine: dict, figures_dir: Path, site: Path,
           used: list[sources.Source]) -> Study:
    """A study's card data; copies its key figure into the site."""
    title, question = _question(main.nb)
    pm = main.nb.metadata.get("papermill", {})
    study = Study(run=main, title=title or main.stem, question=question, variants=variants,
                  run_on=machine_label(machine) if main.executed else "",
                  run_at=(pm.get("end_time") or "")[:16].replace("T", " ") if main.executed else "")
    fig = _key_figure(main.stem, main.nb, figures_dir)
    if fig is not None:
        (site / "figures").mkdir(exist_ok=True)
        shutil.copyfile(fig, site / "figures" / fig.name)
        used.append(sources.source("figure", fig, copy=f"figures/{fig.name}"))
        study.key_figure = fig.name
    return study


def shared_styles(page: str, site: Path, depth: int) -> str:
    """``page`` with each large inline stylesheet moved to static/<sha256 prefix>.css."""
    import hashlib

    def link(m: re.Match) -> str:
        css = m.group(1)
        if len(css) < _SHARED_MIN:
            return m.group(0)
        name = f"static/{hashlib.sha256(css.encode()).hexdigest()[:16]}.css"
        if not (site / name).exists():
            atomic_write_text(site / name, css)
        return f'<link rel="stylesheet" href="{"../" * depth}{name}">'

    return _STYLE_BLOCK.sub(link, page)


def _write_run(site: Path, run: Run, label: str, used: list[sources.Source]) -> None:
    page = shared_styles(_convert(run, label), site, 1)
    atomic_write_text(site / "notebooks" / f"{run.name}.html", page)
    if run.executed:
        shutil.copyfile(run.executed, site / "notebooks" / f"{run.name}.ipynb")
        used.append(sources.source("executed", run.executed, copy=f"notebooks/{run.name}.ipynb",
                                   of=run.source))


def _write_site(site: Path, summary: dict, figures_dir: Path, results_dir: Path,
                notebooks_dir: Path | None) -> list[sources.Source]:
    """Every page of the site into the (temporary) folder ``site``; returns what it read."""
    from labkit.core import env

    machine = summary.get("machine") or env.fingerprint()
    labels = machine_labels(results_dir, summary)
    used: list[sources.Source] = []
    results = _results_pages(site, results_dir, labels, used)
    (site / "notebooks").mkdir()
    studies, all_runs = [], []
    for main, variants in collect_runs(notebooks_dir):
        used.append(sources.source("notebook", main.source))
        study = _study(main, variants, machine, figures_dir, site, used)
        study.results = results.get(main.stem, [])
        label = f"run on {study.run_on}, {study.run_at} UTC" if main.executed else ""
        for run in (main, *variants):
            _write_run(site, run, label, used)
        studies.append(study)
        all_runs += [main, *variants]

    atomic_write_text(site / "index.html", _index(studies, summary))
    atomic_write_text(site / "refresh.html", _refresh_page(all_runs, labels, summary))
    problems = [(p.relative_to(site), s) for p in site.rglob("*.html")
                for s in external_resources(p.read_text(encoding="utf-8"))]
    if problems:  # the temporary folder is discarded: the old site stays as it was
        raise RuntimeError(f"site would request outside hosts: {problems[:3]}")
    return used


def _provenance(summary: dict) -> str:
    if not summary:
        return "No run summary: the pages show whatever build/notebooks holds."
    mode = "quick parameters" if summary.get("quick") else "full parameters"
    machine = machine_label(summary.get("machine") or {})
    return f"The run of {summary.get('finished', '?')[:16].replace('T', ' ')} UTC on {machine} ({mode})."


def _refresh_page(runs: list[Run], labels: dict[str, str], summary: dict) -> str:
    found = [f for run in runs for f in run.claims]
    without = [run.name for run in runs if run.executed and not run.claims]
    return _page("Refresh sheet: every measured claim",
                 refresh.sheet_body(found, labels, without, _provenance(summary)), 0)


def _card(s: Study) -> str:
    stem = s.run.stem
    fig = (f'<a href="notebooks/{stem}.html"><img src="figures/{html.escape(s.key_figure)}" '
           f'alt="key figure of {stem}"></a>' if s.key_figure else "<p class='meta'>no figure yet</p>")
    if s.run.executed:
        held = sum(f.claim.ok for f in s.run.claims)
        when = (f"run on {html.escape(s.run_on)}, {html.escape(s.run_at)} UTC; "
                f"<a href='notebooks/{stem}.html#cell-id=lab-intro-1'>{held} of {len(s.run.claims)} "
                "claims hold</a>")
    else:
        when = "<span class='pending'>not executed in this build</span>"
    also = " · ".join(f'<a href="notebooks/{html.escape(v.name)}.html">{html.escape(v.name.split("@", 1)[1])}</a>'
                      for v in s.variants)
    others = " · ".join(
        f'<a href="results/{stem}/{m}.html">{html.escape(label)}</a>' for m, label in s.results
    ) or "none recorded yet"
    return (
        f'<div class="card"><h2><a href="notebooks/{stem}.html">{markdown_html(s.title, inline=True)}</a></h2>'
        f"{markdown_html(s.question)}{fig}<p class='meta'>{when}</p>"
        + (f"<p class='meta'>also run on: {also}</p>" if also else "")
        + f"<p class='meta'>results by machine: {others}</p></div>"
    )


def _index(studies: list[Study], summary: dict) -> str:
    mode = " (quick parameters)" if summary.get("quick") else ""
    body = (
        "<h1>Studies</h1>"
        "<p>Each study asks one question about running language models on-device, answers it with "
        f"measurements on the machine named on its card{mode}, and checks its prose against its "
        "numbers. The <a href='refresh.html'>refresh sheet</a> lists every checked claim by topic. "
        "Results recorded on other machines are linked under each card.</p>"
        f"<div class='cards'>{''.join(_card(s) for s in studies)}</div>"
    )
    return _page("On-device LLM lab", body, 0)


def publish(target: Path | None = None, notebooks_dir: Path | None = None) -> Path:
    """Build the site of the last run into ``docs/`` (what GitHub Pages serves), after checking
    that the run may be published (:func:`labkit.lab.sources.publish_problems`)."""
    from labkit.lab.reproduce import discover, jobs_for

    runs = [(job.name, job.path, paths.build_dir() / "notebooks" / f"{job.name}.ipynb")
            for job in jobs_for(discover(notebooks_dir=notebooks_dir))]  # model runs included
    problems = sources.publish_problems(_summary(), runs)
    if problems:
        raise RuntimeError("not publishing:\n  " + "\n  ".join(problems))
    target = target or paths.root() / "docs"
    build_site(target, notebooks_dir)
    atomic_write_text(target / ".nojekyll", "")  # serve the files as they are, no Jekyll pass
    left = sources.verify(target, require_full=True)
    if left:
        raise RuntimeError("the published site does not match the checkout:\n  " + "\n  ".join(left))
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="labkit site", description=__doc__.split("\n")[0])
    parser.add_argument("--publish", action="store_true",
                        help="build into docs/ (a clean, complete, full run only)")
    args = parser.parse_args(argv)
    if args.publish:
        try:
            out = publish()
        except RuntimeError as exc:
            print(exc)
            return 1
    else:
        out = build_site()
    print(f"site written to {out} (open {out / 'index.html'}; the refresh sheet: {out / 'refresh.html'})")
    return 0
