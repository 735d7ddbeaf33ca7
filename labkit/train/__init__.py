"""labkit.train: the corpus, tokenizer and training loop of the embedded decoder (tiny-llama).

``main(argv)`` is the ``labkit train`` command; modules load torch and tokenizers only when
called, so importing this package stays light.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run ``labkit train`` with ``argv`` (see labkit/train/cli.py); returns the exit code."""
    from labkit.train.cli import main as _main

    return _main(argv)


__all__ = ["main"]
