"""labkit.core.claims: a claim is shown with its value, carried in its output bundle, then asserted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from labkit.core import claims


def test_check_shows_the_claim_and_its_value(capsys, monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOK", "01_demo")
    assert claims.check("two is more than one", np.bool_(2 > 1), "2 vs 1") is None
    assert capsys.readouterr().out == "OK   two is more than one: 2 vs 1\n"


def test_a_false_claim_is_shown_then_fails(capsys):
    with pytest.raises(AssertionError, match=r"claim does not hold: one is more than two \(1 vs 2\)"):
        claims.check("one is more than two", 1 > 2, "1 vs 2")
    assert capsys.readouterr().out.startswith("FAIL one is more than two: 1 vs 2")


@pytest.mark.parametrize("args, error", [
    (("", True, "1"), ValueError),
    (("a claim", True, ""), ValueError),
    (("a claim", True, 3.0), ValueError),  # the value in words, as the reader should see it
    (("a claim", "yes", "1"), TypeError),
    (("a claim", pd.Series([True, False]), "1"), ValueError),  # ambiguous: say .all()
])
def test_check_refuses_what_is_not_a_claim(args, error):
    with pytest.raises(error):
        claims.check(*args)


def test_topic_must_be_a_refresh_topic():
    claims.check("a control token moves the distribution", True, "KL 0.3 nats", topic="control-tokens")
    with pytest.raises(ValueError, match="topic must be one of"):
        claims.check("x", True, "1", topic="misc")


def test_check_all_shows_every_verdict_before_failing(capsys):
    rows = [("a", True, "1"), ("b", False, "2"), ("c", False, "3"), ("d", True, "4")]
    with pytest.raises(AssertionError) as exc:
        claims.check_all(rows)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["OK", "FAIL", "FAIL", "OK"]
    assert "b (2)" in str(exc.value) and "c (3)" in str(exc.value)


def test_the_output_bundle_round_trips_through_a_notebook_output():
    c = claims.Claim("8-bit stays close", True, "3e-4 nat", topic="quantization", machine="abc",
                     run="03_quantization_error")
    bundle = c._repr_mimebundle_()
    assert bundle["text/plain"] == "OK   8-bit stays close: 3e-4 nat"
    assert "<strong>3e-4 nat</strong>" in bundle["text/html"]
    output = {"output_type": "display_data", "data": bundle, "metadata": {}}
    others = [{"output_type": "stream", "name": "stdout", "text": "OK   not a claim"},
              {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {}}]
    assert claims.from_outputs([*others, output]) == [c]


def test_html_of_a_claim_is_escaped():
    bundle = claims.Claim("a <b> & c", False, "|x| < 1").__dict__
    html_text = claims.Claim(**bundle)._repr_mimebundle_()["text/html"]
    assert "<b>" not in html_text and "&lt;b&gt;" in html_text and "FAIL" in html_text


def test_a_claim_this_run_does_not_test_is_na_never_ok(capsys):
    claims.check_all([("a", True, "1"), ("quick mode: too few samples", None, "3 of 4"),
                      ("b", True, "2")])
    claims.check("another model", None, "0.4")
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["OK", "n/a", "OK", "n/a"]
    assert "quick mode: too few samples: 3 of 4 (not asserted in this run)" in out[1]
