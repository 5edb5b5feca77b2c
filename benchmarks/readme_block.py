"""Rewrite a generated block of README.md: the text between a start and an end marker line."""

from __future__ import annotations

import os

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def replace_block(start: str, end: str, body: str, path: str = README) -> None:
    """Replace what lies between the lines ``start`` and ``end`` in ``path`` with ``body``.

    Raises:
        SystemExit: ``path`` lacks either marker (nothing is written).
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start!r} ... {end!r} block to update")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + start + "\n" + body.rstrip("\n") + "\n" + end + tail)
