"""How a layout looks: the boxes' colours (shared by the node's preview and the browser editor) and the preview
drawing (numbered boxes over the layout photo or mask)."""

from __future__ import annotations

import colorsys

import numpy as np

from .value import Layout

PREVIEW_SIDE = 512
COLORS = ((255, 99, 71), (65, 150, 255), (80, 200, 120), (255, 200, 40))
DROPPED_COLOR = (150, 150, 150)
BACKGROUND = (40, 40, 48)


def hex_color(rgb) -> str:
    """``(r, g, b)`` in 0..255 -> ``#rrggbb``."""
    r, g, b = rgb
    return f"#{r:02x}{g:02x}{b:02x}"


def box_colors(count: int) -> list[str]:
    """One colour per box: the four :data:`COLORS` first, then hues of their own for box 5 and later (spread by the
    golden angle, so neighbours never look alike)."""
    colors = [hex_color(c) for c in COLORS]
    for k in range(len(colors), count):
        r, g, b = colorsys.hls_to_rgb(((k - len(COLORS)) * 0.381966 + 0.83) % 1.0, 0.6, 0.85)
        colors.append(hex_color((round(r * 255), round(g * 255), round(b * 255))))
    return colors


def _label(draw, xy, text: str, color) -> None:
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text)
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
    draw.text((x, y), text, fill=color)


def _preview_size(width: int, height: int) -> tuple[float, tuple[int, int]]:
    scale = PREVIEW_SIDE / max(width, height)
    return scale, (max(1, round(width * scale)), max(1, round(height * scale)))


def render_preview(layout: Layout, background: np.ndarray | None = None, dropped=()) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` picture (longest side 512) of the numbered boxes of ``layout``.

    ``background`` (an RGB uint8 array, e.g. the layout photo placed where the faces were taken from) is drawn
    dimmed underneath; ``dropped`` boxes (faces left out) are drawn in grey.
    """
    from PIL import Image, ImageDraw

    scale, size = _preview_size(layout.width, layout.height)
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
    colors = box_colors(len(layout.boxes))  # the editor's colours, so box 5+ look the same in both
    for k, (x1, y1, x2, y2) in enumerate(layout.boxes):
        color = colors[k]
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=color, width=3)
        _label(draw, (box[0] + 6, box[1] + 4), str(k + 1), color)
    return np.asarray(canvas)


def photo_on_output(photo: np.ndarray, mapping, width: int, height: int) -> np.ndarray:
    """The layout photo drawn where ``mapping`` (a :class:`.photo.PhotoFraming`) puts it in a ``width x height``
    output, at preview resolution."""
    from PIL import Image

    preview_scale, size = _preview_size(width, height)
    canvas = Image.new("RGB", size, BACKGROUND)
    s = mapping.scale * preview_scale
    pw, ph = max(1, round(photo.shape[1] * s)), max(1, round(photo.shape[0] * s))
    placed = Image.fromarray(photo).resize((pw, ph), Image.BILINEAR)
    canvas.paste(placed, (round(mapping.offset_x * preview_scale), round(mapping.offset_y * preview_scale)))
    return np.asarray(canvas)


def mask_on_output(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A ``[h, w]`` mask in 0..1 as a grey RGB picture of the output, at preview resolution."""
    from PIL import Image

    _, size = _preview_size(width, height)
    grey = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
    return np.asarray(grey.convert("RGB"))
