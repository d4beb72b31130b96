"""Faces: antelopev2 detection and ArcFace embeddings, crops (layouts from photos: withanyone_core.layout.photo).

The torch ArcFace for training losses lives in :mod:`withanyone_core.faces.torch_arcface`
(imported on demand: it needs onnx2torch).
"""

from .analysis import (
    ANTELOPEV2_FILES,
    DEFAULT_FACE_CHOICE,
    DETECTOR_FILE,
    FACE_CHOICES,
    RECOGNIZER_FILE,
    Face,
    FaceAnalyzer,
    FaceIndexError,
    FaceModelsNotFound,
    NoFaceError,
    count_noun,
    find_antelopev2_dir,
    no_face_message,
    onnx_providers,
    rank_faces,
    select_face,
)
from .crops import arcface_crop, siglip_crop, square_box
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    image_size,
    load_image,
    to_rgb_uint8,
)

# Layouts from a photo's faces or a mask live in withanyone_core.layout.photo, which uses this package's detector
# types; their old names here are looked up there on first use (importing it at this point would be a circle).
_LAYOUT_NAMES = frozenset(
    {
        "FRAMINGS",
        "PhotoFraming",
        "PhotoLayout",
        "box_masks",
        "boxes_from_mask",
        "fit_boxes",
        "layout_boxes_from_image",
        "layout_from_faces",
        "layout_from_photo",
        "map_face_boxes",
        "photo_framing",
    }
)


def __getattr__(name: str):
    if name in _LAYOUT_NAMES:
        from ..layout import photo

        return getattr(photo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANTELOPEV2_FILES",
    "DEFAULT_FACE_CHOICE",
    "DEFAULT_MAX_PIXELS",
    "DETECTOR_FILE",
    "FACE_CHOICES",
    "FRAMINGS",
    "RECOGNIZER_FILE",
    "Face",
    "FaceIndexError",
    "FaceAnalyzer",
    "FaceModelsNotFound",
    "ImageReadError",
    "ImageTooLargeError",
    "NoFaceError",
    "PhotoFraming",
    "PhotoLayout",
    "arcface_crop",
    "box_masks",
    "boxes_from_mask",
    "count_noun",
    "decode_image",
    "find_antelopev2_dir",
    "fit_boxes",
    "image_size",
    "layout_boxes_from_image",
    "layout_from_faces",
    "layout_from_photo",
    "load_image",
    "map_face_boxes",
    "no_face_message",
    "onnx_providers",
    "photo_framing",
    "rank_faces",
    "select_face",
    "siglip_crop",
    "square_box",
    "to_rgb_uint8",
]
