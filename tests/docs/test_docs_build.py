"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages or API objects fail it),
and every page in ``docs/`` is in the navigation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _nav_pages(nav) -> set[str]:
    pages = set()
    for item in nav:
        for value in item.values():
            pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert _nav_pages(config["nav"]) == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    support = (tmp_path / "site" / "support" / "index.html").read_text()
    assert "plane_max_div_affine" in support and "<!-- support-matrix -->" not in support  # generated, not the marker
