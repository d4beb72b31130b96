"""Small helpers for node schemas shared by the node modules."""

from __future__ import annotations


def advanced(inp):
    """Mark a V3 input as a power-user option (the frontend folds ``advanced`` inputs away where it supports it)."""
    inp.extra_dict = {**inp.extra_dict, "advanced": True}
    return inp
