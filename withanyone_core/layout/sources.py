"""Where a layout's boxes come from: typed text, a preset for 1-4 people (a photo or a mask: :mod:`.photo`).

The Multi-ID Layout node and the editor's HTTP route both read boxes here, so the browser shows exactly
what the node will produce.
"""

from __future__ import annotations

import math

from .value import Layout

SOURCES = ("preset", "text", "image", "mask")
# a layout's canvas range in the node and the editor (its width / height inputs), and the most boxes a typed layout
# holds: one per person, and Identity Encode takes 4; the rest is room for sketching in the editor
SIZE_RANGE = (256, 4096)
MAX_BOXES = 64

# face boxes as fractions of (width, height): side by side at head height
PRESETS = {
    1: [(0.38, 0.18, 0.62, 0.50)],
    2: [(0.18, 0.22, 0.40, 0.52), (0.60, 0.22, 0.82, 0.52)],
    3: [(0.08, 0.25, 0.28, 0.52), (0.40, 0.20, 0.60, 0.47), (0.72, 0.25, 0.92, 0.52)],
    4: [(0.05, 0.28, 0.23, 0.52), (0.29, 0.22, 0.47, 0.46), (0.53, 0.22, 0.71, 0.46), (0.77, 0.28, 0.95, 0.52)],
}


def _read_box_line(number: int, line: str, width: int, height: int) -> tuple[float, float, float, float]:
    """One ``x1,y1,x2,y2`` line -> pixels. Fractions: all four within 0..1. Pixels: anything else, except a
    line that mixes fractions below 1 with values above 1 (``0.5,0.5,1,2``), which is refused as ambiguous."""
    parts = [p for p in line.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"layout line {number} ({line!r}): use four numbers x1,y1,x2,y2") from None
    if len(values) != 4:
        raise ValueError(f"layout line {number} ({line!r}): expected 4 numbers x1,y1,x2,y2, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"layout line {number} ({line!r}): every number must be finite (no nan or inf)")
    if all(0.0 <= v <= 1.0 for v in values):
        values = [values[0] * width, values[1] * height, values[2] * width, values[3] * height]
    elif any(0.0 < v < 1.0 for v in values):
        fractions = ", ".join(f"{v:g}" for v in values if 0.0 < v < 1.0)
        pixels = ", ".join(f"{v:g}" for v in values if not 0.0 <= v <= 1.0)
        raise ValueError(
            f"layout line {number} ({line!r}) mixes fractions ({fractions}) with pixels ({pixels}): write all four "
            f"as 0-1 fractions of the size or all four in pixels of the {width}x{height} output"
        )
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"layout line {number} ({line!r}): x2 must exceed x1 and y2 must exceed y1")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(f"layout line {number} ({line!r}) lies outside the {width}x{height} image")
    return x1, y1, x2, y2


def parse_boxes(text: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """One ``x1,y1,x2,y2`` per line (``#`` comments and blank lines skipped), in pixels of the output or,
    when all four numbers lie within 0..1, fractions of its width and height. At most :data:`MAX_BOXES`."""
    if not isinstance(text, str):
        raise ValueError(f"boxes must be text (one x1,y1,x2,y2 per line), got {type(text).__name__}")
    boxes = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(boxes) == MAX_BOXES:  # stop reading: a pasted file of millions of lines is refused at once
            raise ValueError(
                f"more than {MAX_BOXES} boxes given (line {number} is box {MAX_BOXES + 1}): a layout "
                f"holds one box per person, and Identity Encode takes up to 4 people; remove lines"
            )
        boxes.append(_read_box_line(number, line, width, height))
    if not boxes:
        raise ValueError("no boxes given: write one x1,y1,x2,y2 per line (pixels or 0-1 fractions)")
    return boxes


def preset_boxes(people: int, width: int, height: int) -> list[tuple[float, float, float, float]]:
    out = []
    for fx1, fy1, fx2, fy2 in PRESETS[people]:
        # square faces: the box side follows the smaller of the two scaled sides
        cx, cy = (fx1 + fx2) / 2 * width, (fy1 + fy2) / 2 * height
        side = min((fx2 - fx1) * width, (fy2 - fy1) * height)
        out.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return out


def layout_from_text(text: str, width: int, height: int) -> Layout:
    """A :class:`Layout` of the boxes typed in ``text`` (see :func:`parse_boxes`)."""
    return Layout(width, height, parse_boxes(text, width, height))


def layout_from_preset(people: int, width: int, height: int) -> Layout:
    """The preset :class:`Layout` for ``people`` (1-4) side by side."""
    if isinstance(people, bool) or people not in PRESETS:
        raise ValueError(
            f"a preset layout is for 1 to {max(PRESETS)} people, got {people!r}: choose one of "
            f"{', '.join(map(str, PRESETS))} or give the boxes as text"
        )
    return Layout(width, height, preset_boxes(people, width, height))
