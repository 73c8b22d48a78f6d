"""MkDocs hooks: generated content, so that the site states what the code does rather than what someone typed.

``<!-- support-matrix -->`` in a page is replaced by :func:`normlayers.support.support_matrix_markdown`, which probes
every layer. On machines without CUDA the probes run the Triton kernels through the Triton interpreter, which must be
switched on before anything imports triton (mkdocstrings imports the package to read its docstrings): so here, when
MkDocs loads this file.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MARKER = "<!-- support-matrix -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from normlayers.support import support_matrix_markdown

    return markdown.replace(MARKER, support_matrix_markdown())
