"""``python -m labkit.train``: see labkit/train/cli.py."""

from labkit.train.cli import main

raise SystemExit(main())
