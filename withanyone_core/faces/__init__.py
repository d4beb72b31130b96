"""Faces: antelopev2 detection and ArcFace embeddings, crops, layouts from photos.

The torch ArcFace for training losses lives in :mod:`withanyone_core.faces.torch_arcface`
(imported on demand: it needs onnx2torch).
"""

from .analysis import (
    ANTELOPEV2_FILES,
    DETECTOR_FILE,
    RECOGNIZER_FILE,
    Face,
    FaceAnalyzer,
    FaceModelsNotFound,
    NoFaceError,
    find_antelopev2_dir,
    onnx_providers,
    select_face,
)
from .crops import arcface_crop, siglip_crop, square_box
from .images import ImageReadError, load_image, to_rgb_uint8
from .layout import fit_boxes, layout_boxes_from_image

__all__ = [
    "ANTELOPEV2_FILES", "DETECTOR_FILE", "RECOGNIZER_FILE", "Face", "FaceAnalyzer", "FaceModelsNotFound",
    "ImageReadError", "NoFaceError", "arcface_crop", "find_antelopev2_dir", "fit_boxes", "layout_boxes_from_image",
    "load_image", "onnx_providers", "select_face", "siglip_crop", "square_box", "to_rgb_uint8",
]
