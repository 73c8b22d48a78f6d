"""Makes the shared 2-process harness, ``gloo_ranks.py``, importable by the tests here (with
``--import-mode=importlib`` no file under tests/ is importable by name otherwise)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
