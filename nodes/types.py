"""Values passed between WithAnyone nodes, and their ComfyUI socket types."""

from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from ..withanyone_core.layout import Layout  # noqa: F401  (the LAYOUT socket's value: face boxes on their canvas)

ADAPTER = io.Custom("WITHANYONE_ADAPTER")
FACE_ANALYZER = io.Custom("WITHANYONE_FACE_ANALYZER")
LAYOUT = io.Custom("WITHANYONE_LAYOUT")
FACES = io.Custom("WITHANYONE_FACES")
IDENTITIES = io.Custom("WITHANYONE_IDENTITIES")
SIGLIP = io.Custom("WITHANYONE_SIGLIP")


@dataclass(frozen=True)
class FacePhoto:
    """The reference face found in one photo."""

    image_index: int
    bbox: tuple[float, float, float, float]
    embedding: object  # np.ndarray [512] raw ArcFace
    siglip_crop: object  # np.ndarray 512x512x3 uint8
    score: float | None = None  # the detector's confidence in this face
    masked: bool = False  # the SigLIP crop's background was blanked through a mask
    image_sha256: str | None = None  # of the photo's RGB pixels (saved identities' metadata)


@dataclass(frozen=True)
class EncodedPerson:
    """One person already encoded (raw ArcFace [512], SigLIP [tokens, 768], CPU float32): Identity Encode uses it
    as it is, without SigLIP. Made by Save / Load WithAnyone Identity."""

    arcface: object  # torch.Tensor
    siglip: object  # torch.Tensor
    photos: int
    name: str
    source: str | None = None  # the saved-identity file it was loaded from


@dataclass(frozen=True)
class Faces:
    """Reference faces of one person (one per photo of the input batch); ``encoded`` when already encoded (a
    loaded identity has no photos, only ``encoded``)."""

    photos: tuple[FacePhoto, ...]
    skipped: tuple[int, ...] = ()  # indices of input photos left out (no usable face, no_face = skip)
    encoded: EncodedPerson | None = None


@dataclass(frozen=True)
class Identities:
    """Persons in order: raw ArcFace ``arcface`` [n, 512] and SigLIP ``siglip`` [n, 256, 768] (CPU float32)."""

    arcface: object  # torch.Tensor
    siglip: object  # torch.Tensor
    photos_per_person: tuple[int, ...]

    @property
    def count(self) -> int:
        return int(self.arcface.shape[0])


@dataclass(frozen=True)
class SiglipModel:
    """A SigLIP encoder (preprocessing + vision tower) and the ModelPatcher ComfyUI manages it with."""

    encoder: object  # withanyone_core.siglip.SiglipEncoder
    patcher: object
