"""`make html`: a static site of the executed notebooks, readable without Python.

Why nbconvert (and not jupyter-book): it is already a Jupyter dependency, renders exactly what
the executed notebook holds (outputs, figures embedded as data URIs), and needs no second
configuration tree; the landing page and the results pages are small enough to write here.

The site makes no request to any outside host: nbconvert's CDN scripts (require.js, MathJax)
are left out, and `external_resources()` lists anything that would still reach out, which the
tests require to be empty. Links to papers in the prose are plain anchors, not requests.

Layout of ``build/site/``::

    index.html                    one card per study: question, key figure, machine and date
    notebooks/NN_slug.html        the executed notebook (code cells collapsible)
    results/<study>/<machine>.html  every recorded measurement of a study on one machine
    figures/<name>.png            the key figures shown on the landing page
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from labkit.core import paths
from labkit.core.files import atomic_dir, atomic_write_text
from labkit.core.results import machine_label

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

# No favicon request (a 404 would be a console error): an empty inline icon on every page.
_ICON = '<link rel="icon" href="data:,">'

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header.lab{background:#1d3557;color:#fff;padding:14px 28px}
header.lab a{color:#fff;text-decoration:none;margin-right:18px}
main.lab{max-width:1100px;margin:24px auto;padding:0 24px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:18px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:16px}
.card h2{font-size:1.1em;margin:0 0 8px}
.card img{width:100%;height:auto;border:1px solid #eee}
.meta{color:#555;font-size:.85em}
table.rec{border-collapse:collapse;font-size:.85em}
table.rec td,table.rec th{border:1px solid #ddd;padding:3px 8px;text-align:left}
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
class Study:
    """One notebook as the site shows it."""

    stem: str
    title: str
    question: str
    executed: bool
    run_on: str = ""
    run_at: str = ""
    key_figure: str | None = None
    results: list[tuple[str, str]] = field(default_factory=list)  # (machine id, label)


def external_resources(text: str) -> list[str]:
    """Snippets of HTML that would make a browser request an outside host (empty means none)."""
    return [text[max(0, m.start() - 40) : m.end() + 60] for m in _EXTERNAL.finditer(text)]


def _question(nb) -> tuple[str, str]:
    """Title (first heading) and question (the '**The question.**' paragraph, else the first one)."""
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        return "", ""
    lines = nb.cells[0].source.strip().splitlines()
    title = lines[0].lstrip("#").strip() if lines else ""
    paragraphs = [p.strip() for p in "\n".join(lines[1:]).split("\n\n") if p.strip()]
    chosen = next((p for p in paragraphs if "question" in p.lower()[:40]), paragraphs[0] if paragraphs else "")
    chosen = re.sub(r"^\**\s*(the\s+)?question[.:]?\s*\**\s*", "", chosen, flags=re.IGNORECASE)
    chosen = re.sub(r"\*\*(.*?)\*\*", r"\1", chosen).replace("\n", " ")
    return title, chosen


def _summary() -> dict:
    path = paths.build_dir() / "reproduce-summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _outputs_root(summary: dict) -> Path:
    """Where the run that produced build/notebooks wrote its figures and results."""
    if os.environ.get("LABKIT_OUTPUT_ROOT"):
        return paths.output_root()
    return paths.build_dir() / "quick" if summary.get("quick") else paths.root()


def _convert(nb_path: Path, executed: bool) -> str:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(nb_path, as_version=4)
    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    exporter.widget_renderer_url = ""
    exporter.jupyter_widgets_base_url = ""
    body, _ = exporter.from_notebook_node(nb)
    body = _CDN_TAGS.sub("", body)
    banner = (
        '<header class="lab"><a href="../index.html">&larr; all studies</a>'
        '<button id="lab-toggle-all" data-state="shown">hide all code</button></header>'
    )
    if not executed:
        banner += (
            '<p class="pending" style="padding:0 28px">Not executed in this build: showing the '
            "notebook's source. Run <code>make reproduce</code> to fill in its outputs.</p>"
        )
    body = body.replace("</head>", f"{_ICON}<style>{_STYLE}</style>{_TOGGLE}</head>", 1)
    return re.sub(r"(<body[^>]*>)", r"\1" + banner, body, count=1)


def _results_pages(site: Path, results_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """One HTML table per (study, machine); returns study -> [(machine id, label)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    if not results_dir.exists():
        return out
    for study_dir in sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name != "machines"):
        for jsonl in sorted(study_dir.glob("*.jsonl")):
            machine = jsonl.stem
            fp_path = results_dir / "machines" / f"{machine}.json"
            label = (machine_label(json.loads(fp_path.read_text())) if fp_path.exists()
                     else f"{machine} (fingerprint not committed)")
            rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
            cells = "".join(
                "<tr>" + "".join(
                    f"<td>{html.escape(str(v))}</td>"
                    for v in (r["metric"], f"{r['value']:.6g}", r["unit"], r["runtime"], r["device"],
                              r["model"], json.dumps(r["params"], sort_keys=True), r["created"][:19])
                ) + "</tr>"
                for r in rows
            )
            head = "".join(f"<th>{h}</th>" for h in
                           ("metric", "value", "unit", "runtime", "device", "model", "params", "created"))
            page = (
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{study_dir.name} on {machine}"
                f"</title>{_ICON}<style>{_STYLE}</style></head><body><header class='lab'>"
                f"<a href='../../index.html'>&larr; all studies</a>"
                f"<a href='../../notebooks/{study_dir.name}.html'>{study_dir.name}</a></header>"
                f"<main class='lab'><h1>{study_dir.name}: results on {html.escape(label)}</h1>"
                f"<p class='meta'>machine id {machine}; {len(rows)} records from "
                f"<code>data/results/{study_dir.name}/{jsonl.name}</code></p>"
                f"<table class='rec'><tr>{head}</tr>{cells}</table></main></body></html>"
            )
            atomic_write_text(site / "results" / study_dir.name / f"{machine}.html", page)
            out.setdefault(study_dir.name, []).append((machine, label))
    return out


def _key_figure(stem: str, nb, figures_dir: Path) -> Path | None:
    """The notebook's key figure: metadata labkit.key_figure if set, else its first figure by name."""
    wanted = nb.metadata.get("labkit", {}).get("key_figure")
    if wanted and (figures_dir / f"{wanted}.png").exists():
        return figures_dir / f"{wanted}.png"
    found = sorted(figures_dir.glob(f"{stem}-*.png")) if figures_dir.exists() else []
    return found[0] if found else None


def build_site(out_dir: Path | None = None, notebooks_dir: Path | None = None) -> Path:
    """Write the site into ``build/site`` (atomically: a new folder replaces the old one)."""


    summary = _summary()
    outputs = _outputs_root(summary)
    figures_dir, results_dir = outputs / "figures", outputs / "data" / "results"
    final = out_dir or paths.build_dir() / "site"
    with atomic_dir(final) as site:
        _write_site(site, summary, figures_dir, results_dir, notebooks_dir)
    return final


def _write_site(site: Path, summary: dict, figures_dir: Path, results_dir: Path,
                notebooks_dir: Path | None) -> None:
    """Every page of the site into the (temporary) folder ``site``."""
    import nbformat

    from labkit.core import env
    from labkit.lab.reproduce import discover


    machine = summary.get("machine") or env.fingerprint()
    results = _results_pages(site, results_dir)
    executed_dir = paths.build_dir() / "notebooks"
    studies: list[Study] = []
    for src in discover(notebooks_dir=notebooks_dir):
        executed_path = executed_dir / f"{src.stem}.ipynb"
        executed = executed_path.exists()
        nb = nbformat.read(executed_path if executed else src, as_version=4)
        title, question = _question(nb)
        pm = nb.metadata.get("papermill", {})
        study = Study(
            stem=src.stem, title=title or src.stem, question=question, executed=executed,
            run_on=machine_label(machine) if executed else "",
            run_at=(pm.get("end_time") or "")[:16].replace("T", " ") if executed else "",
            results=results.get(src.stem, []),
        )
        fig = _key_figure(src.stem, nb, figures_dir)
        if fig is not None:
            (site / "figures").mkdir(exist_ok=True)
            shutil.copyfile(fig, site / "figures" / fig.name)
            study.key_figure = fig.name
        atomic_write_text(site / "notebooks" / f"{src.stem}.html",
                      _convert(executed_path if executed else src, executed))
        studies.append(study)

    atomic_write_text(site / "index.html", _index(studies, summary))
    problems = [(p.relative_to(site), s) for p in site.rglob("*.html")
                for s in external_resources(p.read_text(encoding="utf-8"))]
    if problems:  # the temporary folder is discarded: build/site stays as it was
        raise RuntimeError(f"site would request outside hosts: {problems[:3]}")


def _index(studies: list[Study], summary: dict) -> str:
    cards = []
    for s in studies:
        fig = (f'<a href="notebooks/{s.stem}.html"><img src="figures/{html.escape(s.key_figure)}" '
               f'alt="key figure of {s.stem}"></a>' if s.key_figure else "<p class='meta'>no figure yet</p>")
        when = (f"run on {html.escape(s.run_on)}, {html.escape(s.run_at)} UTC" if s.executed
                else "<span class='pending'>not executed in this build</span>")
        others = " · ".join(
            f'<a href="results/{s.stem}/{m}.html">{html.escape(label)}</a>' for m, label in s.results
        ) or "none recorded yet"
        cards.append(
            f'<div class="card"><h2><a href="notebooks/{s.stem}.html">{html.escape(s.title)}</a></h2>'
            f"<p>{html.escape(s.question)}</p>{fig}<p class='meta'>{when}</p>"
            f"<p class='meta'>results by machine: {others}</p></div>"
        )
    mode = " (quick parameters)" if summary.get("quick") else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>On-device LLM lab</title>"
        f"{_ICON}<style>{_STYLE}</style></head><body><header class='lab'><strong>On-device LLM lab</strong>"
        "</header><main class='lab'><h1>Studies</h1>"
        "<p>Each study asks one question about running language models on-device, answers it with "
        f"measurements on the machine named on its card{mode}, and checks its prose against its numbers. "
        "Results recorded on other machines are linked under each card.</p>"
        f"<div class='cards'>{''.join(cards)}</div></main></body></html>"
    )


def main(argv: list[str] | None = None) -> int:
    out = build_site()
    print(f"site written to {out} (open {out / 'index.html'})")
    return 0
