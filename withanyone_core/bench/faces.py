"""Face models of MultiID-Bench: insightface ``buffalo_l`` (the authors') or ``antelopev2`` (what users have).

The authors run ``insightface.app.FaceAnalysis(name="buffalo_l").prepare(det_thresh=0.45)``
(640 px detection) on PIL images converted to BGR, take every face of the output and
ground-truth photos, and, for each reference photo, the first face FaceAnalysis returns
(the highest detection score) after padding the photo onto a black square 1.5 times its
long side (tight face crops are otherwise missed by the detector). Only the detector and
the recognizer change an embedding, so only those two models are run here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..faces import FaceAnalyzer, FaceModelsNotFound, onnx_providers, to_rgb_uint8

logger = logging.getLogger(__name__)

DET_THRESH = 0.45  # the authors' FaceAnalysis.prepare(det_thresh=0.45)
REFERENCE_PAD_RATIO = 1.5
FACE_MODEL_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}


def pad_reference(image: np.ndarray, ratio: float = REFERENCE_PAD_RATIO) -> np.ndarray:
    """The authors' ``pad_image``: centred on a black square of side int(ratio * long side)."""
    image = to_rgb_uint8(image, "reference")
    h, w = image.shape[:2]
    side = int(max(h, w) * ratio)
    out = np.zeros((side, side, 3), np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = image
    return out


def find_face_model_dir(root: str | os.PathLike, name: str) -> Path:
    """``root/models/<name>/`` (or ``root/<name>/``, or ``root`` itself) holding the model's two ONNX files."""
    if name not in FACE_MODEL_FILES:
        raise ValueError(f"face model must be one of {sorted(FACE_MODEL_FILES)}, got {name!r}")
    root = Path(root).expanduser()
    needed = FACE_MODEL_FILES[name]
    for folder in (root / "models" / name, root / "models" / name / name, root / name, root):
        if all((folder / f).is_file() for f in needed):
            return folder
    raise FaceModelsNotFound(
        f"insightface {name} models not found under {root}: put {' and '.join(needed)} (from the {name} release "
        f"of insightface) in {root / 'models' / name}/ (in ComfyUI: ComfyUI/models/insightface/models/{name}/)"
        + (" - or score with the pack's antelopev2 (--face-model antelopev2)" if name == "buffalo_l" else "")
    )


class _Buffalo(FaceAnalyzer):
    """FaceAnalyzer's detection and recognition with buffalo_l's detector and recognizer."""

    def __init__(self, folder: Path, providers: str, det_thresh: float, det_size: int = 640):
        from insightface.model_zoo import model_zoo

        det_file, rec_file = FACE_MODEL_FILES["buffalo_l"]
        self.folder = folder
        self.providers = onnx_providers(providers)
        self.det_thresh = float(det_thresh)
        self.det_size = int(det_size)
        self.detector = model_zoo.get_model(str(folder / det_file), providers=self.providers)
        self.recognizer = model_zoo.get_model(str(folder / rec_file), providers=self.providers)
        if type(self.detector).__name__ != "SCRFD" or type(self.recognizer).__name__ != "ArcFaceONNX":
            raise FaceModelsNotFound(
                f"{folder}: {det_file} / {rec_file} are not a face detector / recognizer; re-download buffalo_l"
            )
        self.detector.prepare(0, input_size=(self.det_size, self.det_size), det_thresh=self.det_thresh)


class InsightFaceModel:
    """Embeddings of every face of an image, and of a reference photo's face, with one insightface model."""

    kind = "arcface"  # the column name the authors give insightface's recognizer

    def __init__(
        self,
        root: str | os.PathLike,
        name: str = "buffalo_l",
        det_thresh: float = DET_THRESH,
        providers: str = "auto",
        pad_references: bool = True,
    ):
        folder = find_face_model_dir(root, name)
        self.name = name
        self.pad_references = pad_references
        if name == "antelopev2":
            self.analyzer = FaceAnalyzer(folder, providers=providers, det_thresh=det_thresh)
        else:
            self.analyzer = _Buffalo(folder, providers, det_thresh)
        logger.info("identity metrics: insightface %s from %s (threshold %.2f)", name, folder, det_thresh)

    @classmethod
    def from_analyzer(cls, analyzer: FaceAnalyzer, name: str = "antelopev2", pad_references: bool = True):
        """Wrap an already loaded analyzer (the ComfyUI node's face analyzer)."""
        model = cls.__new__(cls)
        model.name, model.analyzer, model.pad_references = name, analyzer, pad_references
        return model

    def _detect_by_score(self, image: np.ndarray):
        faces = self.analyzer.detect(image)
        return sorted(faces, key=lambda f: -f.score)  # FaceAnalysis keeps the detector's score order

    def faces(self, image: np.ndarray) -> np.ndarray:
        """Raw embeddings [k, 512] of every face found (highest score first)."""
        image = to_rgb_uint8(image)
        faces = self._detect_by_score(image)
        self.analyzer.embed(image, faces)
        return np.array([f.embedding for f in faces], dtype=np.float64).reshape(-1, 512)

    def reference(self, image: np.ndarray) -> np.ndarray | None:
        """The embedding of a reference photo's face (padded first, as the authors do); ``None`` without one."""
        image = pad_reference(image) if self.pad_references else to_rgb_uint8(image)
        faces = self._detect_by_score(image)
        if not faces:
            return None
        self.analyzer.embed(image, faces[:1])
        return np.asarray(faces[0].embedding, dtype=np.float64)
