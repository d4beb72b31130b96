"""Wording shared by the library's messages."""

from __future__ import annotations


def count_noun(count: int, singular: str, plural: str | None = None) -> str:
    """``1 face``, ``2 faces``: the number with the noun in the right form."""
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"
