"""Multi-person layout node: where each person's face goes in the output image."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from comfy_api.latest import io

from withanyone_core.faces.layout import FRAMINGS

from .types import FACE_ANALYZER, LAYOUT, Layout

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
PREVIEW_SIDE = 512
COLORS = ((255, 99, 71), (65, 150, 255), (80, 200, 120), (255, 200, 40))

# the node's output size range (its width / height inputs), and the most boxes a layout holds: one per person, and
# Identity Encode takes 4; the rest is room for sketching in the editor
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
            f"as 0-1 fractions of the size or all four in pixels of the {width}x{height} output")
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
            raise ValueError(f"more than {MAX_BOXES} boxes given (line {number} is box {MAX_BOXES + 1}): a layout "
                             f"holds one box per person, and Identity Encode takes up to 4 people; remove lines")
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


DROPPED_COLOR = (150, 150, 150)
BACKGROUND = (40, 40, 48)
SOURCES = ("preset", "text", "image", "mask")
FRAMING_TOOLTIP = ("image: how the photo is framed in the output. square (the authors'): a square of the photo "
                   "holding every face, scaled uniformly and centred in the output; fill: a window of the "
                   "output's aspect ratio, so a wide output is filled. Either way the window grows when the faces "
                   "do not fit, so every face lands inside the output.")


def _label(draw, xy, text: str, color) -> None:
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text)
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
    draw.text((x, y), text, fill=color)


def draw_preview(layout: Layout, background: np.ndarray | None = None, dropped=()) -> torch.Tensor:
    """A ``[1, H, W, 3]`` IMAGE (longest side 512) with the numbered boxes of ``layout``.

    ``background`` (an RGB uint8 array at the output size, e.g. the layout photo placed where the faces
    were taken from) is drawn dimmed underneath; ``dropped`` boxes (faces left out) are drawn in grey.
    """
    from PIL import Image, ImageDraw

    scale = PREVIEW_SIDE / max(layout.width, layout.height)
    size = (max(1, round(layout.width * scale)), max(1, round(layout.height * scale)))
    if background is not None:
        photo = Image.fromarray(np.ascontiguousarray(background)).resize(size, Image.BILINEAR)
        canvas = Image.blend(Image.new("RGB", size, BACKGROUND), photo, 0.55)
    else:
        canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for x1, y1, x2, y2 in dropped:
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=DROPPED_COLOR, width=1)
        _label(draw, (box[0] + 4, box[1] + 3), "left out", DROPPED_COLOR)
    from .routes import box_colors  # the editor's colours, so box 5+ look the same in both

    colors = box_colors(len(layout.boxes))
    for k, (x1, y1, x2, y2) in enumerate(layout.boxes):
        color = colors[k]
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=color, width=3)
        _label(draw, (box[0] + 6, box[1] + 4), str(k + 1), color)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def _photo_on_output(photo: np.ndarray, mapping, width: int, height: int) -> np.ndarray:
    """The layout photo drawn where ``mapping`` puts it in a ``width x height`` output (for the preview)."""
    from PIL import Image

    preview_scale = PREVIEW_SIDE / max(width, height)  # render at preview resolution only
    size = (max(1, round(width * preview_scale)), max(1, round(height * preview_scale)))
    canvas = Image.new("RGB", size, BACKGROUND)
    s = mapping.scale * preview_scale
    pw, ph = max(1, round(photo.shape[1] * s)), max(1, round(photo.shape[0] * s))
    placed = Image.fromarray(photo).resize((pw, ph), Image.BILINEAR)
    canvas.paste(placed, (round(mapping.offset_x * preview_scale), round(mapping.offset_y * preview_scale)))
    return np.asarray(canvas)


def _mask_on_output(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    preview_scale = PREVIEW_SIDE / max(width, height)
    size = (max(1, round(width * preview_scale)), max(1, round(height * preview_scale)))
    grey = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
    return np.asarray(grey.convert("RGB"))


class WithAnyoneLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneLayout",
            display_name="WithAnyone Multi-ID Layout",
            category=CATEGORY,
            description="Where each person's face goes: boxes from text, a preset for 1-4 people, the faces of an "
                        "example photo, or the regions of a mask. Box k belongs to identity k; boxes from a photo "
                        "or a mask are numbered left to right. Also outputs one mask per person and their union.",
            inputs=[
                io.Int.Input("width", default=768, min=SIZE_RANGE[0], max=SIZE_RANGE[1], step=16,
                             tooltip="output width in pixels (the authors' demo: 768)"),
                io.Int.Input("height", default=768, min=SIZE_RANGE[0], max=SIZE_RANGE[1], step=16,
                             tooltip="output height in pixels (the authors' demo: 768)"),
                io.Combo.Input("source", options=list(SOURCES), default="preset",
                               tooltip="preset: side-by-side faces for `people`; text: the boxes below; image: the "
                                       "faces of layout_image; mask: the regions of layout_mask"),
                io.Int.Input("people", default=2, min=1, max=4,
                             tooltip="preset: how many people. image / mask: the most faces / regions taken "
                                     "(image: those with the highest detection scores; mask: the largest regions), "
                                     "numbered left to right"),
                io.String.Input("boxes", multiline=True, default="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
                                tooltip="text: one x1,y1,x2,y2 per line; all four within 0-1 = fractions of the "
                                        "size, otherwise pixels (a line mixing the two is refused)"),
                io.Image.Input("layout_image", optional=True, tooltip="image: a photo with the people placed"),
                FACE_ANALYZER.Input("face_analyzer", optional=True, tooltip="image: finds the faces"),
                io.Mask.Input("layout_mask", optional=True,
                              tooltip="mask: one white blob per person's face (painted, or from a segmentation "
                                      "node), stretched to the output size"),
                io.Combo.Input("image_framing", options=list(FRAMINGS), default="square", optional=True,
                               tooltip=FRAMING_TOOLTIP),
            ],
            outputs=[
                LAYOUT.Output(display_name="layout", tooltip="face boxes in output pixels, box k for person k; also "
                                                               "the image size"),
                io.Image.Output(display_name="preview",
                                tooltip="the numbered boxes (over the layout photo or mask when there is one)"),
                io.Mask.Output(display_name="person_masks",
                               tooltip="one mask per person (batch of n), 1 inside that person's box, at the "
                                       "output size"),
                io.Mask.Output(display_name="mask", tooltip="the union of the boxes at the output size"),
            ],
        )

    @classmethod
    def execute(cls, width: int, height: int, source: str, people: int, boxes: str,
                layout_image: torch.Tensor | None = None, face_analyzer=None, layout_mask: torch.Tensor | None = None,
                image_framing: str = "square") -> io.NodeOutput:
        from withanyone_core.faces import box_masks

        background, dropped = None, []
        if source == "preset":
            found = preset_boxes(people, width, height)
        elif source == "text":
            found = parse_boxes(boxes, width, height)
        elif source == "image":
            found, background, dropped = cls._from_photo(width, height, people, layout_image, face_analyzer,
                                                         image_framing)
        elif source == "mask":
            found, background = cls._from_mask(width, height, people, layout_mask)
        else:
            raise ValueError(f"unknown layout source {source!r}; use one of {', '.join(SOURCES)}")
        layout = Layout(width, height, tuple(tuple(float(v) for v in b) for b in found))
        masks = torch.from_numpy(box_masks(layout.boxes, width, height))
        union = masks.amax(dim=0, keepdim=True)
        return io.NodeOutput(layout, draw_preview(layout, background, dropped), masks, union)

    @staticmethod
    def _from_photo(width, height, people, layout_image, face_analyzer, framing):
        if layout_image is None or face_analyzer is None:
            raise ValueError("source 'image' needs a layout_image and a face_analyzer connected")
        from withanyone_core.faces import layout_from_photo, to_rgb_uint8

        if layout_image.shape[0] > 1:
            logger.warning("layout_image is a batch of %d; the layout comes from the first", layout_image.shape[0])
        photo = to_rgb_uint8(layout_image[0].detach().cpu().float().numpy(), "layout image")
        placed = layout_from_photo(face_analyzer, photo, width, height, max_faces=people, framing=framing)
        logger.info("layout from the photo (%dx%d, %s framing): %s", photo.shape[1], photo.shape[0], framing,
                    "; ".join(f"person {k + 1}: face at [{', '.join(f'{v:.0f}' for v in f.bbox)}] score "
                              f"{f.score:.2f} -> [{', '.join(f'{v:.0f}' for v in b)}]"
                              for k, (f, b) in enumerate(zip(placed.faces, placed.boxes))))
        background = _photo_on_output(photo, placed.mapping, width, height)
        return placed.boxes, background, placed.dropped_boxes()

    @staticmethod
    def _from_mask(width, height, people, layout_mask):
        if layout_mask is None:
            raise ValueError("source 'mask' needs a layout_mask connected (one white region per person's face)")
        from withanyone_core.faces import boxes_from_mask

        mask = layout_mask.detach().cpu().float()
        if mask.ndim == 3:
            if mask.shape[0] > 1:
                logger.info("layout_mask is a batch of %d masks: their union is used", mask.shape[0])
            mask = mask.amax(dim=0)
        mask = mask.numpy()
        found = boxes_from_mask(mask, width, height, max_regions=people)
        return found, _mask_on_output(mask, width, height)


NODES = [WithAnyoneLayout]
