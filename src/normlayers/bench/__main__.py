"""``python -m normlayers.bench``: the same as the ``normlayers-bench`` command."""

from normlayers.bench.cli import main

if __name__ == "__main__":  # not on import (e.g. when the docs build inspects the package)
    raise SystemExit(main())
