"""Face extraction and identity encoding nodes."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from .types import FACE_ANALYZER, FACES, IDENTITIES, SIGLIP, FacePhoto, Faces, Identities

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
MAX_PERSONS = 4


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


class WithAnyoneFaceExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneFaceExtract",
            display_name="WithAnyone Face Extract",
            category=CATEGORY,
            description="Finds the reference face in every photo of the batch (one person, several photos allowed). "
                        "Outputs the faces and a preview of the SigLIP crops.",
            inputs=[
                io.Image.Input("image", tooltip="photos of ONE person (a batch of several photos is averaged)"),
                FACE_ANALYZER.Input("face_analyzer"),
                io.Int.Input("face_index", default=-1, min=-1, max=32,
                             tooltip="-1: the largest face; 0, 1, ...: faces from largest to smallest"),
                io.Int.Input("min_face_size", default=64, min=0, max=2048,
                             tooltip="ignore faces smaller than this many pixels"),
            ],
            outputs=[FACES.Output(display_name="faces"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, face_analyzer, face_index: int, min_face_size: int) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        from withanyone_core.faces import select_face, siglip_crop

        photos = []
        bar = comfy.utils.ProgressBar(image.shape[0])
        for i in range(image.shape[0]):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pixels = _to_uint8(image[i])
            name = f"photo {i + 1} of {image.shape[0]}"
            faces = face_analyzer.detect(pixels)
            face = select_face(faces, index=None if face_index < 0 else face_index, image_name=name,
                               min_size=min_face_size)
            face_analyzer.embed(pixels, [face])
            photos.append(FacePhoto(i, tuple(float(v) for v in face.bbox), face.embedding, siglip_crop(pixels, face)))
            bar.update(1)
        preview = torch.from_numpy(np.stack([p.siglip_crop for p in photos]).astype(np.float32) / 255.0)
        return io.NodeOutput(Faces(tuple(photos)), preview)


class WithAnyoneIdentityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneIdentityEncode",
            display_name="WithAnyone Identity Encode",
            category=CATEGORY,
            description="Persons 1-4, in order (person k goes into layout box k). Several photos of one person: "
                        "their raw ArcFace embeddings and SigLIP features are averaged.",
            inputs=[
                SIGLIP.Input("siglip"),
                FACES.Input("person_1"),
                FACES.Input("person_2", optional=True),
                FACES.Input("person_3", optional=True),
                FACES.Input("person_4", optional=True),
            ],
            outputs=[IDENTITIES.Output(display_name="identities")],
        )

    @classmethod
    def execute(cls, siglip, person_1: Faces, person_2: Faces | None = None, person_3: Faces | None = None,
                person_4: Faces | None = None) -> io.NodeOutput:
        import comfy.model_management

        persons = [p for p in (person_1, person_2, person_3, person_4) if p is not None]
        comfy.model_management.load_models_gpu([siglip.patcher])
        arcface, features = [], []
        for person in persons:
            comfy.model_management.throw_exception_if_processing_interrupted()
            arcface.append(torch.from_numpy(np.mean([p.embedding for p in person.photos], axis=0)).float())
            feats = siglip.encoder.encode([p.siglip_crop for p in person.photos]).float().cpu()
            features.append(feats.mean(dim=0))
        return io.NodeOutput(Identities(torch.stack(arcface), torch.stack(features),
                                        tuple(len(p.photos) for p in persons)))


NODES = [WithAnyoneFaceExtract, WithAnyoneIdentityEncode]
