"""MkDocs hooks: generated content, so that the site states what the code does rather than what someone typed.

``<!-- support-matrix -->`` in a page is replaced by :func:`normlayers.support.support_matrix_markdown`, which probes
every layer (its Triton ops run through the Triton interpreter on machines without CUDA).
"""

from __future__ import annotations

import os

MARKER = "<!-- support-matrix -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from normlayers.support import support_matrix_markdown

    return markdown.replace(MARKER, support_matrix_markdown())
