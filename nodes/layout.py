"""Multi-person layout node: where each person's face goes in the output image."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from .types import FACE_ANALYZER, LAYOUT, Layout

CATEGORY = "WithAnyone"
PREVIEW_SIDE = 512
COLORS = ((255, 99, 71), (65, 150, 255), (80, 200, 120), (255, 200, 40))

# face boxes as fractions of (width, height): side by side at head height
PRESETS = {
    1: [(0.38, 0.18, 0.62, 0.50)],
    2: [(0.18, 0.22, 0.40, 0.52), (0.60, 0.22, 0.82, 0.52)],
    3: [(0.08, 0.25, 0.28, 0.52), (0.40, 0.20, 0.60, 0.47), (0.72, 0.25, 0.92, 0.52)],
    4: [(0.05, 0.28, 0.23, 0.52), (0.29, 0.22, 0.47, 0.46), (0.53, 0.22, 0.71, 0.46), (0.77, 0.28, 0.95, 0.52)],
}


def parse_boxes(text: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """One ``x1,y1,x2,y2`` per line, in pixels or (all four <= 1) fractions of the size."""
    boxes = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p for p in line.replace(";", ",").replace(" ", ",").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"layout line {number} ({line!r}): use four numbers x1,y1,x2,y2") from None
        if len(values) != 4:
            raise ValueError(f"layout line {number} ({line!r}): expected 4 numbers x1,y1,x2,y2, got {len(values)}")
        if all(0.0 <= v <= 1.0 for v in values):
            values = [values[0] * width, values[1] * height, values[2] * width, values[3] * height]
        x1, y1, x2, y2 = values
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"layout line {number} ({line!r}): x2 must exceed x1 and y2 must exceed y1")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ValueError(f"layout line {number} ({line!r}) lies outside the {width}x{height} image")
        boxes.append((x1, y1, x2, y2))
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


def draw_preview(layout: Layout) -> torch.Tensor:
    """A ``[1, H, W, 3]`` IMAGE with the numbered boxes (longest side 512)."""
    from PIL import Image, ImageDraw

    scale = PREVIEW_SIDE / max(layout.width, layout.height)
    size = (max(1, round(layout.width * scale)), max(1, round(layout.height * scale)))
    canvas = Image.new("RGB", size, (40, 40, 48))
    draw = ImageDraw.Draw(canvas)
    for k, (x1, y1, x2, y2) in enumerate(layout.boxes):
        color = COLORS[k % len(COLORS)]
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=color, width=3)
        draw.text((box[0] + 6, box[1] + 4), str(k + 1), fill=color)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


class WithAnyoneLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneLayout",
            display_name="WithAnyone Multi-ID Layout",
            category=CATEGORY,
            description="Where each person's face goes: boxes from text, a preset for 1-4 people, or the faces "
                        "of an example photo (left to right). Box k belongs to identity k.",
            inputs=[
                io.Int.Input("width", default=1024, min=256, max=4096, step=16),
                io.Int.Input("height", default=1024, min=256, max=4096, step=16),
                io.Combo.Input("source", options=["preset", "text", "image"], default="preset"),
                io.Int.Input("people", default=2, min=1, max=4, tooltip="preset: how many people"),
                io.String.Input("boxes", multiline=True, default="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
                                tooltip="text: one x1,y1,x2,y2 per line, in pixels or 0-1 fractions"),
                io.Image.Input("layout_image", optional=True, tooltip="image: a photo with the people placed"),
                FACE_ANALYZER.Input("face_analyzer", optional=True, tooltip="image: finds the faces"),
            ],
            outputs=[LAYOUT.Output(display_name="layout"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, width: int, height: int, source: str, people: int, boxes: str,
                layout_image: torch.Tensor | None = None, face_analyzer=None) -> io.NodeOutput:
        if source == "preset":
            found = preset_boxes(people, width, height)
        elif source == "text":
            found = parse_boxes(boxes, width, height)
        elif source == "image":
            if layout_image is None or face_analyzer is None:
                raise ValueError("source 'image' needs a layout_image and a face_analyzer connected")
            from withanyone_core.faces import layout_boxes_from_image

            photo = (layout_image[0].cpu().numpy() * 255).round().astype(np.uint8)
            found = layout_boxes_from_image(face_analyzer, photo, width, height, max_faces=4)
        else:
            raise ValueError(f"unknown layout source {source!r}")
        layout = Layout(width, height, tuple(tuple(float(v) for v in b) for b in found))
        return io.NodeOutput(layout, draw_preview(layout))


NODES = [WithAnyoneLayout]
