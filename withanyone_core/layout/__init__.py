"""Layout: where each person's face goes, as one concept.

- :mod:`.value`: the :class:`Layout` value (boxes on their canvas, validated) and uniform rescaling;
- :mod:`.sources`: boxes from typed text and presets (what the node and the editor's route read);
- :mod:`.preview`: the boxes' colours and the preview drawing;
- :mod:`.tokens`: boxes -> the image tokens each person covers (what the adapter's attention uses);
- :mod:`.photo`: boxes from an example photo's faces or a mask's regions (imported on demand: it uses the face
  detector's types, :mod:`withanyone_core.faces`).
"""

from .preview import BACKGROUND, COLORS, DROPPED_COLOR, PREVIEW_SIDE, box_colors, render_preview
from .sources import (
    MAX_BOXES,
    PRESETS,
    SIZE_RANGE,
    SOURCES,
    layout_from_preset,
    layout_from_text,
    parse_boxes,
    preset_boxes,
)
from .tokens import (
    PIXELS_PER_TOKEN,
    REGION_RULES,
    BatchBoxes,
    Box,
    RegionLayout,
    TokenGrid,
    box_token_ranges,
    boxes_membership,
    build_layout,
    check_region_rule,
)
from .value import Layout, Size, batch_layouts, rescale_boxes

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DROPPED_COLOR",
    "MAX_BOXES",
    "PIXELS_PER_TOKEN",
    "PRESETS",
    "PREVIEW_SIDE",
    "REGION_RULES",
    "SIZE_RANGE",
    "SOURCES",
    "BatchBoxes",
    "Box",
    "Layout",
    "RegionLayout",
    "Size",
    "TokenGrid",
    "batch_layouts",
    "box_colors",
    "box_token_ranges",
    "boxes_membership",
    "build_layout",
    "check_region_rule",
    "layout_from_preset",
    "layout_from_text",
    "parse_boxes",
    "preset_boxes",
    "render_preview",
    "rescale_boxes",
]
