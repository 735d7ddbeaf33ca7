"""The refresh sheet: every claim the notebooks asserted in this run, with its value, by topic.

The lab's seed keeps a list "for periodic memory refresh" (the KV cache and TTFT, encoder vs
decoder, control tokens, the prompt as context with no line between instruction and input, and
so on). Each of those sentences is a claim some notebook checks against its own measurements
(:func:`labkit.core.claims.check`), so the sheet is generated, never typed: it reads the claims
back out of the executed notebooks and lists each with the value this run measured, the machine
that measured it and a link to the cell that checked it. Rerun the notebooks and the sheet
changes with the numbers.

The same claims open each study page ("the answer in numbers", :func:`answers_html`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from labkit.core.claims import TOPICS, Claim, from_outputs

#: A notebook's claims go under this topic unless a claim names its own (``topic=``). Keyed by
#: the notebook's number, so ``05_encoder_vs_decoder@smollm2-135m`` files like its notebook.
NOTEBOOK_TOPICS = {
    "00": "runtimes",
    "01": "kv-cache",
    "02": "runtimes",
    "03": "quantization",
    "04": "runtimes",
    "05": "encoder-decoder",
    "06": "attention",
    "07": "kv-cache",
    "08": "runtimes",
    "09": "fit",
    "10": "kv-cache",
    "11": "prompt",
    "12": "runtimes",
}


@dataclass(frozen=True)
class Found:
    """A claim where it was checked: the run (executed notebook) and the cell."""

    claim: Claim
    run: str  # the executed notebook's name: 01_kv_cache or 01_kv_cache@smollm2-135m
    cell_id: str
    execution_count: int | None

    @property
    def topic(self) -> str | None:
        """The claim's own topic, else its notebook's; None when neither is known."""
        return self.claim.topic or NOTEBOOK_TOPICS.get(self.run[:2])

    def href(self, page_prefix: str = "notebooks/") -> str:
        """Link to the checking cell on the run's page (nbconvert's ``cell-id=`` anchors)."""
        return f"{page_prefix}{self.run}.html#cell-id={self.cell_id}"

    @property
    def where(self) -> str:
        cell = f"In [{self.execution_count}]" if self.execution_count else f"cell {self.cell_id}"
        return f"{self.run}, {cell}"


def collect(nb: Any, run: str) -> list[Found]:
    """Every claim an executed notebook's outputs carry, in cell order."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for claim in from_outputs(cell.get("outputs", [])):
            found.append(Found(claim, run, cell.get("id", ""), cell.get("execution_count")))
    return found


def _verdict(ok: bool) -> str:
    return "<td class='ok'>OK</td>" if ok else "<td class='fail'>FAIL</td>"


def _row(f: Found, machines: dict[str, str], page_prefix: str) -> str:
    machine = machines.get(f.claim.machine or "", f.claim.machine or "unknown machine")
    return (f"<tr>{_verdict(f.claim.ok)}<td>{html.escape(f.claim.claim)}</td>"
            f"<td class='value'>{html.escape(f.claim.value)}</td>"
            f"<td><a href='{html.escape(f.href(page_prefix))}'>{html.escape(f.where)}</a></td>"
            f"<td>{html.escape(machine)}</td></tr>")


def grouped(found: list[Found]) -> dict[str | None, list[Found]]:
    """Claims by topic, in :data:`TOPICS` order; claims with no known topic under None, last."""
    out: dict[str | None, list[Found]] = {key: [] for key in TOPICS}
    for f in found:
        out.setdefault(f.topic if f.topic in TOPICS else None, []).append(f)
    return {k: v for k, v in out.items() if v}


def sheet_body(found: list[Found], machines: dict[str, str], runs_without: list[str],
               provenance: str) -> str:
    """The refresh sheet's HTML (inside the page's main element)."""
    groups = grouped(found)
    failed = sum(not f.claim.ok for f in found)
    toc = " · ".join(f"<a href='#topic-{k or 'unfiled'}'>{html.escape(TOPICS.get(k, 'Unfiled'))}"
                     f" ({len(v)})</a>" for k, v in groups.items())
    parts = [
        "<h1>Refresh sheet</h1>",
        f"<p>Every claim the notebooks assert, with the value measured in this run, grouped by "
        f"topic. {html.escape(provenance)} Generated from the executed notebooks: rerun them and "
        "it changes with the numbers; each link opens the cell that checked the claim.</p>",
        f"<p class='meta'>{len(found)} claims from {len({f.run for f in found})} runs; "
        f"{len(found) - failed} hold, {failed} fail.</p>",
        f"<p class='toc'>{toc}</p>" if toc else "<p>No claims were checked in this run.</p>",
    ]
    if runs_without:
        parts.append("<p class='meta'>Checked no claims in this run: "
                     f"{html.escape(', '.join(runs_without))}.</p>")
    head = ("<colgroup><col class='verdict'><col class='claim'><col class='value'><col class='where'><col></colgroup>"
            "<tr><th></th><th>claim</th><th>measured here</th><th>checked in</th><th>machine</th></tr>")
    for key, items in groups.items():
        title = TOPICS.get(key, "Unfiled (no topic: give the claim topic= or its notebook a default)")
        rows = "".join(_row(f, machines, "notebooks/") for f in items)
        parts.append(f"<h2 id='topic-{key or 'unfiled'}'>{html.escape(title)}</h2>"
                     f"<table class='rec claims'>{head}{rows}</table>")
    return "".join(parts)


def answers_html(found: list[Found]) -> str:
    """The box that opens a study page: each claim of this run with its value, linked to its cell."""
    if not found:
        return ("<div class='lab-answers'><h2>The answer in numbers</h2><p>This run checked no "
                "claims: the prose below is not backed by an assertion here.</p></div>")
    held = sum(f.claim.ok for f in found)
    items = "".join(
        f"<li class='{'ok' if f.claim.ok else 'fail'}'><span class='verdict {'ok' if f.claim.ok else 'fail'}'>"
        f"{'OK' if f.claim.ok else 'FAIL'}</span> "
        f"{html.escape(f.claim.claim)}: <strong>{html.escape(f.claim.value)}</strong> "
        f"<a href='#cell-id={html.escape(f.cell_id)}'>(cell)</a></li>"
        for f in found
    )
    return (f"<div class='lab-answers'><h2>The answer in numbers</h2><p class='meta'>{held} of "
            f"{len(found)} claims hold in this run, each checked by an assertion in the cell linked."
            f"</p><ul>{items}</ul></div>")
