"""Face detection and ArcFace embeddings with insightface's antelopev2 models.

Only the two models WithAnyone needs run: the SCRFD detector and the glintr100
recognizer (the reference's ``FaceAnalysis`` also runs the 3D/2D landmark and
gender/age models on every face, and detects at two scales).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..wording import count_noun
from .images import load_image, to_rgb_uint8

logger = logging.getLogger(__name__)

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
# the full antelopev2 release; only the first two are used here
ANTELOPEV2_FILES = (DETECTOR_FILE, RECOGNIZER_FILE, "1k3d68.onnx", "2d106det.onnx", "genderage.onnx")
MAX_DETECT_SIDE = 2048  # larger images are detected on a downscaled copy, cropped at full size


class NoFaceError(ValueError):
    """No usable face in an image; the message names the image and what to do."""


class FaceIndexError(NoFaceError):
    """A face index beyond the faces of a photo: a setting to fix, not a photo to skip."""


class FaceModelsNotFound(FileNotFoundError):
    """The antelopev2 folder is missing or incomplete; the message lists the files and place."""


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the analysed image."""

    bbox: np.ndarray  # float32 [4] x1, y1, x2, y2
    kps: np.ndarray  # float32 [5, 2] eyes, nose, mouth corners
    score: float
    embedding: np.ndarray | None = None  # float32 [512] raw ArcFace (what WithAnyone uses)

    @property
    def normed_embedding(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        return (self.embedding / max(float(np.linalg.norm(self.embedding)), 1e-12)).astype(np.float32)

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return self.width * self.height


def find_antelopev2_dir(root: str | os.PathLike) -> Path:
    """The folder holding the antelopev2 ONNX files under a models root.

    Accepts ``root/models/antelopev2/``, the nested ``root/models/antelopev2/antelopev2/``
    that unzipping the release produces, and ``root`` being the antelopev2 folder itself.
    """
    root = Path(root).expanduser()
    candidates = [
        root / "models" / "antelopev2",
        root / "models" / "antelopev2" / "antelopev2",
        root / "antelopev2",
        root / "antelopev2" / "antelopev2",
        root,
    ]
    required = (DETECTOR_FILE, RECOGNIZER_FILE)
    for folder in candidates:
        if all((folder / name).is_file() for name in required):
            return folder
    present = next((c for c in candidates if c.is_dir() and any(c.glob("*.onnx"))), None)
    missing_note = ""
    if present is not None:
        missing = [n for n in required if not (present / n).is_file()]
        missing_note = f" {present} has ONNX files but lacks {', '.join(missing)}."
    raise FaceModelsNotFound(
        f"insightface antelopev2 models not found under {root}.{missing_note} "
        f"Put {', '.join(ANTELOPEV2_FILES)} (the antelopev2 release; {DETECTOR_FILE} and "
        f"{RECOGNIZER_FILE} are the ones used) in {root / 'models' / 'antelopev2'}/ "
        "(in ComfyUI: ComfyUI/models/insightface/models/antelopev2/)."
    )


def onnx_providers(choice: str = "auto") -> list[str]:
    """'auto' -> CUDA when onnxruntime offers it, else CPU; 'cuda' insists; 'cpu' forces CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    choice = choice.lower()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "CUDA was requested for face analysis but onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or choose CPU"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice != "auto":
        raise ValueError(f"providers must be 'auto', 'cuda' or 'cpu', got {choice!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class FaceAnalyzer:
    """antelopev2 detection + ArcFace recognition through insightface and onnxruntime."""

    def __init__(
        self, models_root: str | os.PathLike, providers: str = "auto", det_thresh: float = 0.4, det_size: int = 640
    ):
        from insightface.model_zoo import model_zoo

        self.folder = find_antelopev2_dir(models_root)
        self.providers = onnx_providers(providers)
        self.det_thresh = float(det_thresh)
        self.det_size = int(det_size)
        self.detector = model_zoo.get_model(str(self.folder / DETECTOR_FILE), providers=self.providers)
        self.recognizer = model_zoo.get_model(str(self.folder / RECOGNIZER_FILE), providers=self.providers)
        if type(self.detector).__name__ != "SCRFD" or type(self.recognizer).__name__ != "ArcFaceONNX":
            raise FaceModelsNotFound(
                f"{self.folder}: {DETECTOR_FILE} / {RECOGNIZER_FILE} are not a face detector / recognizer "
                f"(insightface read them as {type(self.detector).__name__} / {type(self.recognizer).__name__}); "
                "re-download antelopev2"
            )
        self.detector.prepare(0, input_size=(self.det_size, self.det_size), det_thresh=self.det_thresh)
        logger.info(
            "face analysis: antelopev2 from %s on %s (threshold %.2f, size %d)",
            self.folder,
            self.providers[0].replace("ExecutionProvider", ""),
            self.det_thresh,
            self.det_size,
        )

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces (box, landmarks, score) of an RGB uint8 image, largest first (see :func:`rank_faces`)."""
        h, w = image.shape[:2]
        scale = 1.0
        work = image
        if max(h, w) > MAX_DETECT_SIDE:
            import cv2

            scale = MAX_DETECT_SIDE / max(h, w)
            work = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(work[..., ::-1])
        boxes, kpss = self.detector.detect(bgr, input_size=(self.det_size, self.det_size), det_thresh=self.det_thresh)
        faces = [
            Face(
                bbox=(boxes[i, :4] / scale).astype(np.float32),
                kps=(kpss[i] / scale).astype(np.float32),
                score=float(boxes[i, 4]),
            )
            for i in range(boxes.shape[0])
        ]
        return sorted(faces, key=lambda f: -f.area)

    def embed(self, image: np.ndarray, faces: list[Face]) -> None:
        """Fill ``face.embedding`` (raw ArcFace) for each face, in one batched run."""
        if not faces:
            return
        from .crops import arcface_crop

        crops = [arcface_crop(image, f.kps)[..., ::-1] for f in faces]  # the recognizer takes BGR
        feats = self.recognizer.get_feat(crops)
        for face, feat in zip(faces, feats):
            face.embedding = np.asarray(feat, dtype=np.float32).ravel()

    def extract(
        self,
        image: np.ndarray,
        *,
        choice: str = "highest score",
        index: int = 0,
        min_size: float = 0.0,
        image_name: str = "image",
    ) -> Face:
        """The reference face of a photo (see :func:`select_face`) with its embedding.

        Only that face goes through the recognizer: a group photo costs one detection and
        one recognition, not one per face.
        """
        image = to_rgb_uint8(image, image_name) if isinstance(image, np.ndarray) else load_image(image)
        face = select_face(
            self.detect(image),
            choice=choice,
            index=index,
            image_name=image_name,
            min_size=min_size,
            det_thresh=self.det_thresh,
        )
        self.embed(image, [face])
        return face

    def analyze(self, image: np.ndarray, *, image_name: str = "image", embed: bool = True) -> list[Face]:
        """Every face of an image (RGB uint8, or anything :func:`load_image` reads), largest first."""
        image = to_rgb_uint8(image, image_name) if isinstance(image, np.ndarray) else load_image(image)
        faces = self.detect(image)
        if embed:
            self.embed(image, faces)
        return faces


# How the reference face of a photo is chosen. The authors take the face with the highest
# detection score (insightface returns faces in score order and they use the first).
FACE_CHOICES = ("highest score", "largest", "left to right")
DEFAULT_FACE_CHOICE = "highest score"


def rank_faces(faces: list[Face], choice: str = DEFAULT_FACE_CHOICE) -> list[Face]:
    """Faces in the order ``choice`` ranks them: highest detection score, largest area, or leftmost first.

    Ties keep the incoming order (the sorts are stable).
    """
    if choice == "highest score":
        return sorted(faces, key=lambda f: -f.score)
    if choice == "largest":
        return sorted(faces, key=lambda f: -f.area)
    if choice == "left to right":
        return sorted(faces, key=lambda f: float(f.bbox[0] + f.bbox[2]))
    raise ValueError(f"face choice must be one of {', '.join(FACE_CHOICES)}; got {choice!r}")


def _describe(face: Face) -> str:
    box = ", ".join(f"{v:.0f}" for v in face.bbox)
    return f"box [{box}], {face.width:.0f}x{face.height:.0f} px, score {face.score:.2f}"


def no_face_message(image_name: str, min_size: float = 0.0, det_thresh: float | None = None) -> str:
    """What to do when the detector finds nothing in ``image_name``."""
    threshold = f" at detection threshold {det_thresh:.2f}" if det_thresh is not None else ""
    size = f" and at least {min_size:.0f} px wide (the minimum face size set)" if min_size > 0 else " and not tiny"
    return (
        f"no face found in {image_name}{threshold}: use a photo where the face is clearly visible, "
        f"frontal-ish{size}, or lower the detection threshold"
    )


def select_face(
    faces: list[Face],
    index: int = 0,
    image_name: str = "image",
    min_size: float = 0.0,
    choice: str = DEFAULT_FACE_CHOICE,
    det_thresh: float | None = None,
) -> Face:
    """The reference face among the faces at least ``min_size`` px on their shorter side.

    ``choice`` ranks them (:data:`FACE_CHOICES`; default: the highest detection score, as the
    authors do) and ``index`` picks one of that ranking (0 = the first). A photo with several
    usable faces logs which one was taken and why.
    """
    if index is None or index < 0:  # older callers: None / -1 meant "the automatic choice"
        index = 0
    ranked = rank_faces(faces, choice)  # validates choice even when there is no face
    if not faces:
        raise NoFaceError(no_face_message(image_name, min_size, det_thresh))
    usable = [f for f in ranked if min(f.width, f.height) >= min_size]
    if not usable:
        largest = max(faces, key=lambda f: f.area)
        raise NoFaceError(
            f"{image_name}: {count_noun(len(faces), 'face')} found but "
            f"{'it is' if len(faces) == 1 else 'all are'} smaller than {min_size:.0f} px, the minimum face size "
            f"(largest {largest.width:.0f}x{largest.height:.0f}); use a closer photo or lower min_face_size"
        )
    if index >= len(usable):
        raise FaceIndexError(
            f"{image_name}: face index {index} requested but only {count_noun(len(usable), 'face')} "
            f"{'is' if len(usable) == 1 else 'are'} usable (index 0 = the first by {choice}; "
            f"faces under {min_size:.0f} px are not counted)"
        )
    chosen = usable[index]
    ignored = len(faces) - len(usable)
    if len(usable) > 1 or ignored:
        first = {
            "highest score": "the face with the highest detection score",
            "largest": "the largest face",
            "left to right": "the leftmost face",
        }[choice]
        reason = f"face {index + 1} of {len(usable)} ranked by {choice} (face_index {index})" if index else first
        others = "; ".join(_describe(f) for f in usable if f is not chosen)
        logger.warning(
            "%s has %s%s; took %s (%s)%s. Choose another with face_choice / face_index.",
            image_name,
            count_noun(len(usable), "usable face" if ignored else "face"),
            f" ({ignored} more under {min_size:.0f} px ignored)" if ignored else "",
            reason,
            _describe(chosen),
            f"; the others: {others}" if others else "",
        )
    return chosen
