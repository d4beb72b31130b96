"""FLUX.1 Kontext nodes: the WithAnyone.Ke face-edit preparation and ArcFace-only identities.

Face editing runs on ComfyUI's own Kontext path: the prepared (blurred) photo goes through VAE
Encode into ReferenceLatent on the positive conditioning, the layout and the identities into
WithAnyone Apply (+ Sample) with the Ke adapter. The pure work is in
:mod:`withanyone_core.faces.edit`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..withanyone_core.faces import edit
from ..withanyone_core.layout import Layout
from .schema import advanced
from .types import FACE_ANALYZER, FACES, IDENTITIES, LAYOUT, Faces, Identities

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone/kontext"


def _resized(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if (photo.shape[1], photo.shape[0]) == size:
        return photo
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS))


def prepare_face_edit(
    photo: np.ndarray,
    analyzer,
    *,
    face_order: str,
    box_mapping: str,
    aspect_limit: str,
    megapixels: float,
    min_blur_face: int,
    blur_radius: float,
):
    """(reference RGB uint8 at the target size, Layout, the plan, the photo the boxes refer to)."""
    height, width = photo.shape[:2]
    photo = _resized(photo, edit.scaled_for_megapixels(width, height, megapixels))
    height, width = photo.shape[:2]
    edit.check_aspect(width, height, aspect_limit)  # before detection: say the real problem first
    faces = analyzer.analyze(photo, image_name="the source photo", embed=False)
    plan = edit.plan_face_edit(
        faces,
        width,
        height,
        order=face_order,
        box_mapping=box_mapping,
        aspect_limit=aspect_limit,
        min_blur_face=min_blur_face,
    )
    blurred = edit.blur_faces(photo, plan.blur_boxes, blur_radius)
    reference = edit.reference_image(blurred, plan.width, plan.height)
    layout = Layout(plan.width, plan.height, plan.boxes)
    return reference, layout, plan, photo


class WithAnyoneFaceEditPrepare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneFaceEditPrepare",
            display_name="WithAnyone Face Edit Prepare (Kontext)",
            category=CATEGORY,
            description="The authors' face-edit recipe for WithAnyone.Ke on FLUX.1 Kontext: finds up to 4 faces in "
            "the source photo, blurs those of at least 100 px (Gaussian, radius 15) and returns the "
            "blurred photo (feed it through VAE Encode into ReferenceLatent) and the faces' layout "
            "(box k = identity k) at the target size (the photo's, floored to multiples of 16).",
            inputs=[
                io.Image.Input("image", tooltip="the source photo whose faces are replaced (one photo)"),
                FACE_ANALYZER.Input("face_analyzer", tooltip="from Load WithAnyone Face Analyzer"),
                io.Combo.Input(
                    "face_order",
                    options=list(edit.FACE_ORDERS),
                    default=edit.FACE_ORDERS[0],
                    tooltip="which face is box 1, 2, ...: the detector's order, highest score first "
                    "(the authors'), or left to right. The preview numbers them",
                ),
                io.Combo.Input(
                    "aspect_limit",
                    options=list(edit.ASPECT_LIMITS),
                    default=edit.ASPECT_LIMITS[0],
                    tooltip="the authors accept only near-square photos (aspect 0.9-1.1; the model "
                    "was trained on square ones). 'off' lifts it: the pack maps boxes and "
                    "tokens correctly at any aspect, results may be weaker",
                ),
                io.Float.Input(
                    "megapixels",
                    default=0.0,
                    min=0.0,
                    max=16.0,
                    step=0.05,
                    tooltip="0: the photo's own size (the authors'). Else the photo is first scaled to "
                    "about this many megapixels (1.0 ~ 1024 x 1024), for large phone photos",
                ),
                advanced(
                    io.Combo.Input(
                        "box_mapping",
                        options=list(edit.BOX_MAPPINGS),
                        default=edit.BOX_MAPPINGS[0],
                        tooltip="authors: the boxes as the authors' demo computes them (through a 512 px square and "
                        "back, in integers; under 2 px from the detector's). exact: the detector's boxes",
                    )
                ),
                advanced(
                    io.Int.Input(
                        "min_blur_face",
                        default=edit.BLUR_MIN_FACE,
                        min=0,
                        max=4096,
                        tooltip="faces at least this many pixels wide and high are blurred "
                        "(the authors: 100); smaller ones are edited but not blurred",
                    )
                ),
                advanced(
                    io.Float.Input(
                        "blur_radius",
                        default=float(edit.BLUR_RADIUS),
                        min=0.0,
                        max=200.0,
                        step=0.5,
                        tooltip="Gaussian blur radius in pixels (the authors: 15)",
                    )
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="reference",
                    tooltip="the blurred photo at the target size: VAE Encode -> ReferenceLatent",
                ),
                LAYOUT.Output(display_name="layout", tooltip="the faces' boxes at the target size"),
                io.Image.Output(display_name="preview", tooltip="the photo with the numbered boxes"),
                io.Int.Output(display_name="faces", tooltip="how many faces are edited (connect that many persons)"),
            ],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        face_analyzer,
        face_order: str,
        aspect_limit: str,
        megapixels: float,
        box_mapping: str = edit.BOX_MAPPINGS[0],
        min_blur_face: int = edit.BLUR_MIN_FACE,
        blur_radius: float = float(edit.BLUR_RADIUS),
    ) -> io.NodeOutput:
        from .faces import _photo_pixels
        from .layout import draw_preview

        if image.shape[0] != 1:
            raise ValueError(
                f"WithAnyone Face Edit Prepare edits one photo at a time, got a batch of {image.shape[0]}: "
                "pick one (e.g. with ImageFromBatch)"
            )
        photo = _photo_pixels(image[0], "the source photo")
        reference, layout, plan, photo = prepare_face_edit(
            photo,
            face_analyzer,
            face_order=face_order,
            box_mapping=box_mapping,
            aspect_limit=aspect_limit,
            megapixels=megapixels,
            min_blur_face=min_blur_face,
            blur_radius=blur_radius,
        )
        logger.info(
            "WithAnyone Face Edit: %d face(s) to edit, %d blurred, target %dx%d",
            layout.num_persons,
            len(plan.blur_boxes),
            layout.width,
            layout.height,
        )
        sx, sy = layout.width / photo.shape[1], layout.height / photo.shape[0]
        dropped = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in plan.dropped]
        preview = draw_preview(layout, _resized(photo, (layout.width, layout.height)), dropped=dropped)
        ref = torch.from_numpy(reference.astype(np.float32) / 255.0)[None]
        return io.NodeOutput(ref, layout, preview, layout.num_persons)


class WithAnyoneArcFaceIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneArcFaceIdentities",
            display_name="WithAnyone ArcFace Identities",
            category=CATEGORY,
            description="Persons 1-4 (in order, person k goes into layout box k) as ArcFace embeddings only, for "
            "WithAnyone.Ke, which has no SigLIP branch: no SigLIP model needed. Several photos of one "
            "person are averaged.",
            inputs=[
                FACES.Input("person_1", tooltip="faces of person 1 (layout box 1), from Face Extract or Load Identity"),
                FACES.Input("person_2", optional=True, tooltip="person 2 (box 2); connect persons in order"),
                FACES.Input("person_3", optional=True, tooltip="person 3 (box 3); needs person 2"),
                FACES.Input("person_4", optional=True, tooltip="person 4 (box 4); needs person 3"),
            ],
            outputs=[
                IDENTITIES.Output(
                    display_name="identities",
                    tooltip="ArcFace-only identities (no SigLIP), for a WithAnyone.Ke adapter",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        person_1: Faces,
        person_2: Faces | None = None,
        person_3: Faces | None = None,
        person_4: Faces | None = None,
    ) -> io.NodeOutput:
        from .faces import _persons_in_order

        persons = _persons_in_order([person_1, person_2, person_3, person_4])
        # a saved person (Load WithAnyone Identity) has no photos, only its encoded embedding
        arcface = [
            person.encoded.arcface
            if person.encoded is not None
            else torch.from_numpy(np.mean([p.embedding for p in person.photos], axis=0)).float()
            for person in persons
        ]
        from ..withanyone_core.identity_store import check_encoded

        for k, arc in enumerate(arcface, 1):
            check_encoded(arc, None, f"person_{k}")
        return io.NodeOutput(
            Identities(
                torch.stack(arcface),
                None,
                tuple(p.encoded.photos if p.encoded is not None else len(p.photos) for p in persons),
            )
        )


NODES = [WithAnyoneFaceEditPrepare, WithAnyoneArcFaceIdentities]
