"""Multi-person layout node: where each person's face goes in the output image (the work is in
:mod:`withanyone_core.layout`)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..withanyone_core.faces import to_rgb_uint8
from ..withanyone_core.layout import SIZE_RANGE, SOURCES, Layout, layout_from_preset, layout_from_text, render_preview
from ..withanyone_core.layout.photo import FRAMINGS, box_masks, boxes_from_mask, layout_from_photo
from ..withanyone_core.layout.preview import mask_on_output, photo_on_output
from .types import FACE_ANALYZER, LAYOUT

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
FRAMING_TOOLTIP = (
    "image: how the photo is framed in the output. square (the authors'): a square of the photo "
    "holding every face, scaled uniformly and centred in the output; fill: a window of the "
    "output's aspect ratio, so a wide output is filled. Either way the window grows when the faces "
    "do not fit, so every face lands inside the output."
)


def draw_preview(layout: Layout, background: np.ndarray | None = None, dropped=()) -> torch.Tensor:
    """The preview of ``layout`` (:func:`withanyone_core.layout.render_preview`) as a ``[1, H, W, 3]`` IMAGE."""
    return torch.from_numpy(render_preview(layout, background, dropped).astype(np.float32) / 255.0)[None]


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
                io.Int.Input(
                    "width",
                    default=768,
                    min=SIZE_RANGE[0],
                    max=SIZE_RANGE[1],
                    step=16,
                    tooltip="output width in pixels (the authors' demo: 768)",
                ),
                io.Int.Input(
                    "height",
                    default=768,
                    min=SIZE_RANGE[0],
                    max=SIZE_RANGE[1],
                    step=16,
                    tooltip="output height in pixels (the authors' demo: 768)",
                ),
                io.Combo.Input(
                    "source",
                    options=list(SOURCES),
                    default="preset",
                    tooltip="preset: side-by-side faces for `people`; text: the boxes below; image: the "
                    "faces of layout_image; mask: the regions of layout_mask",
                ),
                io.Int.Input(
                    "people",
                    default=2,
                    min=1,
                    max=4,
                    tooltip="preset: how many people. image / mask: the most faces / regions taken "
                    "(image: those with the highest detection scores; mask: the largest regions), "
                    "numbered left to right",
                ),
                io.String.Input(
                    "boxes",
                    multiline=True,
                    default="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
                    tooltip="text: one x1,y1,x2,y2 per line; all four within 0-1 = fractions of the "
                    "size, otherwise pixels (a line mixing the two is refused)",
                ),
                io.Image.Input("layout_image", optional=True, tooltip="image: a photo with the people placed"),
                FACE_ANALYZER.Input("face_analyzer", optional=True, tooltip="image: finds the faces"),
                io.Mask.Input(
                    "layout_mask",
                    optional=True,
                    tooltip="mask: one white blob per person's face (painted, or from a segmentation "
                    "node), stretched to the output size",
                ),
                io.Combo.Input(
                    "image_framing", options=list(FRAMINGS), default="square", optional=True, tooltip=FRAMING_TOOLTIP
                ),
            ],
            outputs=[
                LAYOUT.Output(
                    display_name="layout",
                    tooltip="face boxes in output pixels, box k for person k; also the image size",
                ),
                io.Image.Output(
                    display_name="preview",
                    tooltip="the numbered boxes (over the layout photo or mask when there is one)",
                ),
                io.Mask.Output(
                    display_name="person_masks",
                    tooltip="one mask per person (batch of n), 1 inside that person's box, at the output size",
                ),
                io.Mask.Output(display_name="mask", tooltip="the union of the boxes at the output size"),
            ],
        )

    @classmethod
    def execute(
        cls,
        width: int,
        height: int,
        source: str,
        people: int,
        boxes: str,
        layout_image: torch.Tensor | None = None,
        face_analyzer=None,
        layout_mask: torch.Tensor | None = None,
        image_framing: str = "square",
    ) -> io.NodeOutput:
        background, dropped = None, []
        if source == "preset":
            layout = layout_from_preset(people, width, height)
        elif source == "text":
            layout = layout_from_text(boxes, width, height)
        elif source == "image":
            found, background, dropped = cls._from_photo(
                width, height, people, layout_image, face_analyzer, image_framing
            )
            layout = Layout(width, height, found)
        elif source == "mask":
            found, background = cls._from_mask(width, height, people, layout_mask)
            layout = Layout(width, height, found)
        else:
            raise ValueError(f"unknown layout source {source!r}; use one of {', '.join(SOURCES)}")
        masks = torch.from_numpy(box_masks(layout.boxes, width, height))
        union = masks.amax(dim=0, keepdim=True)
        return io.NodeOutput(layout, draw_preview(layout, background, dropped), masks, union)

    @staticmethod
    def _from_photo(width, height, people, layout_image, face_analyzer, framing):
        if layout_image is None or face_analyzer is None:
            raise ValueError("source 'image' needs a layout_image and a face_analyzer connected")
        if layout_image.shape[0] > 1:
            logger.warning("layout_image is a batch of %d; the layout comes from the first", layout_image.shape[0])
        photo = to_rgb_uint8(layout_image[0].detach().cpu().float().numpy(), "layout image")
        placed = layout_from_photo(face_analyzer, photo, width, height, max_faces=people, framing=framing)
        logger.info(
            "layout from the photo (%dx%d, %s framing): %s",
            photo.shape[1],
            photo.shape[0],
            framing,
            "; ".join(
                f"person {k + 1}: face at [{', '.join(f'{v:.0f}' for v in f.bbox)}] score "
                f"{f.score:.2f} -> [{', '.join(f'{v:.0f}' for v in b)}]"
                for k, (f, b) in enumerate(zip(placed.faces, placed.boxes))
            ),
        )
        background = photo_on_output(photo, placed.mapping, width, height)
        return placed.boxes, background, placed.dropped_boxes()

    @staticmethod
    def _from_mask(width, height, people, layout_mask):
        if layout_mask is None:
            raise ValueError("source 'mask' needs a layout_mask connected (one white region per person's face)")
        mask = layout_mask.detach().cpu().float()
        if mask.ndim == 3:
            if mask.shape[0] > 1:
                logger.info("layout_mask is a batch of %d masks: their union is used", mask.shape[0])
            mask = mask.amax(dim=0)
        mask = mask.numpy()
        found = boxes_from_mask(mask, width, height, max_regions=people)
        return found, mask_on_output(mask, width, height)


NODES = [WithAnyoneLayout]
