"""Every claim a notebook asserts, shown with the value it rests on and kept for the refresh sheet.

A notebook's "What the numbers say" writes, instead of a bare ``assert``::

    claims.check("8-bit schemes stay below 1e-3 nat of mean KLD", (eight.mean_kld < 1e-3).all(),
                 f"{eight.mean_kld.max():.2g} nat at most")

The cell shows ``OK   8-bit schemes stay below 1e-3 nat of mean KLD: 0.00031 nat at most``, and
then the claim is asserted, so a rerun that contradicts the text still fails the notebook.

Why the claim travels inside the cell's output (a display bundle whose MIME type
``application/vnd.labkit.claim+json`` carries claim, verdict, value, topic and machine) rather
than in a side file: the executed notebook already is the record of a run that the site renders
and that ``docs/site-sources.json`` hashes. Read back from it, each claim comes with the exact
cell that checked it (the site links there), belongs to the very run whose figures and tables
surround it, and cannot drift from it the way a ``build/claims/*.jsonl`` could after a partial
rerun. JupyterLab and nbconvert show the bundle's text or HTML and ignore the JSON.

``TOPICS`` are the refresh topics the sheet groups claims under; a notebook has a default topic
(``labkit.lab.refresh``), and ``topic=`` files one claim elsewhere.
"""

from __future__ import annotations

import html
import os
from dataclasses import asdict, dataclass
from typing import Any

from labkit.core.checks import one_of

MIME = "application/vnd.labkit.claim+json"

#: Refresh topics, in the order the refresh sheet shows them: key -> heading.
TOPICS = {
    "kv-cache": "KV cache and time to first token",
    "encoder-decoder": "Encoder vs decoder",
    "control-tokens": "Control tokens",
    "prompt": "The prompt as context; no line between instruction and input",
    "quantization": "Quantization",
    "attention": "Attention",
    "runtimes": "Runtimes",
    "fit": "Will it fit",
}


@dataclass(frozen=True)
class Claim:
    """One checked claim: what the text says, whether this run's numbers bear it out, and them."""

    claim: str
    ok: bool
    value: str
    topic: str | None = None
    machine: str | None = None
    run: str | None = None

    def __str__(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'} {self.claim}: {self.value}"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        color, word = ("#1a7f37", "OK") if self.ok else ("#b42318", "FAIL")
        shown = (f'<p style="margin:2px 0"><strong style="color:{color}">{word}</strong> '
                 f"{html.escape(self.claim)}: <strong>{html.escape(self.value)}</strong></p>")
        return {"text/plain": str(self), "text/html": shown, MIME: asdict(self)}


def _verdict(ok: Any) -> bool:
    """``ok`` as a bool; a string is a mistake (a pandas Series raises: use .all())."""
    if isinstance(ok, (str, bytes)):
        raise TypeError(f"claims.check needs the verdict as a bool (or None), got {ok!r}")
    return bool(ok)


def _not_asserted(claim: str, value: str) -> None:
    """A claim this run does not test (quick mode, another model, hardware that does not make
    it physical): printed as "n/a" with its value, neither asserted nor kept as a claim, so a
    verdict that was never tested is never shown as held."""
    print(f"n/a  {claim.strip()}: {value.strip()} (not asserted in this run)")


def _show(claim: Claim) -> None:
    """Display in a notebook (the bundle); print elsewhere (a script, a test)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(claim)
        return
    if get_ipython() is None:
        print(claim)
    else:
        display(claim)


def check(claim: str, ok: Any, value: str, *, topic: str | None = None) -> None:
    """Show ``claim`` with this run's ``value`` and its verdict, then assert it.

    ``value``: the measured number(s) the verdict rests on, as the reader should see them
    ("0.31 of each query's attention", "2.4x"). ``ok`` None: this run does not test the claim
    (quick mode, another model, a speed claim off its hardware); it is printed as "n/a". ``topic``: a key of :data:`TOPICS` when the claim
    belongs elsewhere than its notebook's default. Returns nothing, so a check that ends a cell
    is not displayed twice.
    """
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError(f"claims.check needs the claim in words, got {claim!r}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"claims.check({claim!r}) needs the measured value in words, got {value!r}")
    if topic is not None:
        one_of(topic, "topic", TOPICS, owner="claims.check")
    if ok is None:
        _not_asserted(claim, value)
        return
    from labkit.core import env

    record = Claim(claim=claim.strip(), ok=_verdict(ok), value=value.strip(), topic=topic,
                   machine=env.machine_id(), run=os.environ.get("LABKIT_NOTEBOOK"))
    _show(record)
    if not record.ok:
        raise AssertionError(f"claim does not hold: {record.claim} ({record.value})")


def check_all(rows: list[tuple[str, Any, str]], *, topic: str | None = None) -> None:
    """:func:`check` each (claim, ok, value) of ``rows``, showing all of them before failing on any
    (so one wrong number does not hide the verdicts after it).

    An ``ok`` of None (as in :func:`check`) is a claim this run does not test."""
    failed = []
    for claim, ok, value in rows:
        try:
            check(claim, ok, value, topic=topic)
        except AssertionError as exc:
            failed.append(str(exc))
    if failed:
        raise AssertionError("; ".join(failed))


def from_outputs(outputs: list[dict[str, Any]]) -> list[Claim]:
    """The claims a code cell's outputs carry (nbformat output dicts), in order."""
    found = []
    for out in outputs:
        data = out.get("data", {}).get(MIME) if out.get("output_type") == "display_data" else None
        if isinstance(data, dict) and data.get("claim"):
            fields = {k: data.get(k) for k in Claim.__dataclass_fields__}
            found.append(Claim(**{**fields, "ok": bool(fields["ok"]), "value": str(fields["value"])}))
    return found
