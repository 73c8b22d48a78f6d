"""``python -m normlayers.bench``: the same as the ``normlayers-bench`` command."""

from normlayers.bench.cli import main

raise SystemExit(main())
