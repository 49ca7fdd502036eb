"""``python -m comparison``: see :mod:`comparison.cli`."""

from comparison.cli import main

raise SystemExit(main())
