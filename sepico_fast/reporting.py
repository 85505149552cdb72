"""Text for people: one-line error reasons and per-class IoU tables.

Below ``evaluate`` and ``train`` (both print these), above nothing but ``data.labels``
(the class names, imported when a table is drawn).
"""
from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``str(exc)`` (at most ``limit`` characters): enough to
    name a fault in a one-line message without the rest of a long torch error."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line[:limit] if limit is not None else line
