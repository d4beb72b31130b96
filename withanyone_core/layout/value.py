"""The layout value: face boxes on the canvas they were drawn on, one box per person.

A :class:`Layout` is what a layout node outputs, what the HTTP route answers and what the host
contract (:class:`withanyone_core.host.IdentityRequest`) takes. It checks what it is given: each box
four finite numbers ``x1, y1, x2, y2`` with ``x2 > x1`` and ``y2 > y1`` (the left/top corner first),
in pixels of a ``width x height`` canvas of whole positive pixels. A box may reach past the canvas
(a face at the edge of a training crop): it covers the tokens it overlaps, none if it lies outside.

A layout drawn for another image size is mapped into the sampled size the way the authors' demo maps
its 512-px layouts: one uniform scale (the smaller of the two ratios) and centring, so boxes keep
their shape and stay inside the image (:func:`rescale_boxes`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

Size = tuple[int, int]  # (width, height) in pixels
Box = tuple[float, float, float, float]  # x1, y1, x2, y2


def rescale_boxes(boxes: Sequence[Sequence[float]], from_size: Size, to_size: Size) -> list[list[float]]:
    """Map boxes drawn on a ``from_size`` canvas into ``to_size`` (uniform scale, centred)."""
    (fw, fh), (tw, th) = from_size, to_size
    if fw <= 0 or fh <= 0:
        raise ValueError(f"layout size must be positive, got {fw}x{fh}")
    scale = min(tw / fw, th / fh)
    dx, dy = (tw - fw * scale) / 2, (th - fh * scale) / 2
    return [[x1 * scale + dx, y1 * scale + dy, x2 * scale + dx, y2 * scale + dy] for x1, y1, x2, y2 in boxes]


def _shown(value) -> str:
    """A box for a message, short whatever it is."""
    try:
        text = "[" + ", ".join(f"{float(v):g}" for v in value) + "]"
    except (TypeError, ValueError, OverflowError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _side(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(
            f"layout {name} must be a positive whole number of pixels, got {value!r}: give the size of "
            "the canvas the boxes are drawn on"
        )
    return int(value)


def _box(number: int, box, size: str) -> Box:
    """Box ``number`` (1 = person 1) as four floats, or a ValueError naming it and saying what to give."""
    what = f"give four numbers x1, y1, x2, y2 in pixels of the {size} canvas"
    try:
        count = None if isinstance(box, (str, bytes, dict)) else len(box)
    except TypeError:  # a number, a 0-d tensor
        count = None
    if count is None:
        raise ValueError(f"layout box {number} ({_shown(box)}) is not a list of coordinates: {what}")
    if count != 4:
        raise ValueError(f"layout box {number} ({_shown(box)}) has {count} numbers: {what}")
    values = []
    for v in box:
        if isinstance(v, (bool, str, bytes)):
            raise ValueError(f"layout box {number} ({_shown(box)}): {v!r} is not a number: {what}")
        try:
            values.append(float(v))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"layout box {number} ({_shown(box)}): {v!r} is not a number: {what}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"layout box {number} ({_shown(box)}) has a coordinate that is not a finite number (NaN or "
            f"infinity): {what}"
        )
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"layout box {number} ({_shown(box)}) is empty or inverted: x2 must exceed x1 and y2 must "
            "exceed y1 (give the top-left corner first, then the bottom-right one)"
        )
    return x1, y1, x2, y2


@dataclass(frozen=True)
class Layout:
    """Face boxes ``[x1, y1, x2, y2]`` in pixels of a ``width x height`` canvas, one per person, in person order.

    Validated on construction (see the module); ``boxes`` is stored as a tuple of 4-float tuples.
    """

    width: int
    height: int
    boxes: tuple[Box, ...] = field(default_factory=tuple)

    def __post_init__(self):
        width, height = _side("width", self.width), _side("height", self.height)
        boxes = self.boxes
        if isinstance(boxes, (str, bytes, dict)) or not hasattr(boxes, "__iter__"):
            raise ValueError(
                f"layout boxes must be a list of [x1, y1, x2, y2] boxes, one per person; got {type(boxes).__name__}"
            )
        size = f"{width}x{height}"
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "boxes", tuple(_box(k, box, size) for k, box in enumerate(boxes, 1)))

    @property
    def num_persons(self) -> int:
        return len(self.boxes)

    @property
    def size(self) -> Size:
        """``(width, height)`` of the canvas."""
        return self.width, self.height

    def boxes_in(self, size: Size) -> list[list[float]]:
        """The boxes in pixels of an image of ``size`` ``(w, h)`` (uniformly scaled and centred when it differs)."""
        if tuple(size) == self.size:
            return [list(box) for box in self.boxes]
        return rescale_boxes(self.boxes, self.size, tuple(size))

    def rescaled(self, width: int, height: int) -> Layout:
        """This layout mapped onto a ``width x height`` canvas (uniform scale, centred)."""
        return Layout(width, height, self.boxes_in((width, height)))


def batch_layouts(boxes, width: int, height: int) -> tuple[Layout | None, ...]:
    """Boxes in pixels of a ``width x height`` image -> one :class:`Layout` (or None: no layout) per image.

    ``boxes``: one list of boxes for every image, or one entry per image (a list of boxes, or None).
    """
    items = list(boxes)
    first = items[0] if items and items[0] is not None and len(items[0]) > 0 else None
    # a number first (not a box): one list of boxes for all images
    single = first is not None and not isinstance(first[0], (list, tuple)) and getattr(first[0], "ndim", 0) == 0
    per_item = [items] if single else items
    return tuple(None if item is None else Layout(width, height, item) for item in per_item)
