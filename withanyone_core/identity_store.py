"""Saved identities: one person's encoded identity in one safetensors file (no pickle).

A person encoded once (ArcFace from antelopev2, SigLIP features) is written with what it
came from, so it can be used again without the face analyzer or SigLIP:

tensors (all float32, CPU)
    ``arcface``           [512]        the person's raw ArcFace embedding (mean over the photos)
    ``siglip``            [tokens, dim] the person's SigLIP last_hidden_state (mean over the photos)
    ``photo_embeddings``  [photos, 512] each photo's raw ArcFace embedding, in photo order

metadata (safetensors ``__metadata__``, all strings)
    ``format``          ``withanyone.identity``
    ``format_version``  ``1`` (a reader refuses newer versions)
    ``name``            the person's name as given to the Save node
    ``pack_version``    this pack's version (pyproject.toml) that wrote the file
    ``created``         UTC time, ISO 8601
    ``photos``          JSON list, one per photo used: ``image_index``, ``bbox`` [x1, y1, x2, y2]
                        in that photo's pixels, detector ``score``, ``masked``, ``image_sha256``
    ``skipped``         JSON list of input photo indices left out (no usable face)
    ``content_sha256``  SHA-256 over the three tensors' bytes (checked on load)

Pure logic only (no comfy): the nodes in ``nodes/identities.py`` call it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "withanyone.identity"
FORMAT_VERSION = 1
ARCFACE_DIM = 512
TENSOR_NAMES = ("arcface", "siglip", "photo_embeddings")
SUFFIX = ".safetensors"
_PACK_ROOT = Path(__file__).resolve().parents[1]


class IdentityFileError(ValueError):
    """A saved-identity file that cannot be read or written, with a message saying what to do."""


@dataclass(frozen=True)
class SavedPhoto:
    """Where one photo's face came from."""

    image_index: int
    bbox: tuple[float, float, float, float]
    score: float | None = None
    masked: bool = False
    image_sha256: str | None = None


@dataclass(frozen=True)
class SavedIdentity:
    """One person, encoded: what Identity Encode computes for a person, plus where it came from."""

    name: str
    arcface: torch.Tensor  # [512] float32
    siglip: torch.Tensor  # [tokens, dim] float32
    photo_embeddings: torch.Tensor  # [photos, 512] float32
    photos: tuple[SavedPhoto, ...]
    skipped: tuple[int, ...] = ()
    pack_version: str = field(default_factory=lambda: pack_version())
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def same_identity(self, other: SavedIdentity) -> bool:
        """Bit-identical tensors (the metadata may differ)."""
        return all(torch.equal(getattr(self, n), getattr(other, n)) for n in TENSOR_NAMES)


def pack_version() -> str:
    """The version in this pack's pyproject.toml ("unknown" where the file is not shipped)."""
    import tomllib

    try:
        with open(_PACK_ROOT / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def image_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of an RGB uint8 photo's pixels (shape included), the same for the same picture in any file format."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected an RGB uint8 image [height, width, 3], got {pixels.dtype} {pixels.shape}")
    digest = hashlib.sha256(("%dx%dx%d:" % pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def file_name(name: str) -> str:
    """A person's name -> its file name: letters, digits, ``-``, ``_``, ``.`` and spaces kept, anything else ``_``."""
    stem = name.strip()
    if stem.lower().endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    stem = re.sub(r"[^\w\-. ]", "_", stem).strip(" .")
    if not stem:
        raise IdentityFileError(f"name {name!r} gives no file name: use letters or digits, e.g. 'alice'")
    return stem + SUFFIX


def _content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in TENSOR_NAMES:
        tensor = tensors[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _as_float32(name: str, tensor) -> torch.Tensor:
    tensor = torch.as_tensor(tensor).detach().cpu()
    if not tensor.is_floating_point():
        raise IdentityFileError(f"{name} must be a float tensor, got {tensor.dtype}")
    return tensor.to(torch.float32).contiguous()


def _check(identity_tensors: dict[str, torch.Tensor], photos: int, where: str) -> None:
    arcface, siglip, per_photo = (identity_tensors[n] for n in TENSOR_NAMES)
    problems = []
    if tuple(arcface.shape) != (ARCFACE_DIM,):
        problems.append(f"arcface has shape {tuple(arcface.shape)}, expected ({ARCFACE_DIM},)")
    if siglip.ndim != 2 or 0 in siglip.shape:
        problems.append(f"siglip has shape {tuple(siglip.shape)}, expected [tokens, dim]")
    if per_photo.ndim != 2 or per_photo.shape[1:] != (ARCFACE_DIM,) or per_photo.shape[0] != photos or photos < 1:
        problems.append(f"photo_embeddings has shape {tuple(per_photo.shape)}, expected ({photos}, {ARCFACE_DIM}) "
                        f"for {photos} photo(s)")
    for name, tensor in identity_tensors.items():
        if tensor.numel() and not torch.isfinite(tensor).all():
            problems.append(f"{name} holds NaN or infinite values")
    if problems:
        raise IdentityFileError(f"{where}: " + "; ".join(problems))


def save_identity(path: str | os.PathLike, identity: SavedIdentity) -> Path:
    """Write ``identity`` to ``path`` (atomically: a half-written file never replaces a good one)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {n: _as_float32(n, getattr(identity, n)) for n in TENSOR_NAMES}
    _check(tensors, len(identity.photos), f"cannot save {identity.name!r}")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": identity.name,
        "pack_version": identity.pack_version,
        "created": identity.created,
        "photos": json.dumps([{"image_index": p.image_index, "bbox": [float(v) for v in p.bbox],
                               "score": None if p.score is None else float(p.score), "masked": bool(p.masked),
                               "image_sha256": p.image_sha256} for p in identity.photos]),
        "skipped": json.dumps([int(i) for i in identity.skipped]),
        "content_sha256": _content_sha256(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("saved identity %r (%d photo(s)) to %s", identity.name, len(identity.photos), path)
    return path


def _photos_from(text: str, where: str) -> tuple[SavedPhoto, ...]:
    try:
        entries = json.loads(text)
        return tuple(SavedPhoto(int(e["image_index"]), tuple(float(v) for v in e["bbox"]),
                                None if e.get("score") is None else float(e["score"]), bool(e.get("masked", False)),
                                e.get("image_sha256")) for e in entries)
    except (ValueError, TypeError, KeyError) as exc:
        raise IdentityFileError(f"{where}: its photo list is damaged ({exc}): save the person again") from exc


def load_identity(path: str | os.PathLike) -> SavedIdentity:
    """Read and check a file written by :func:`save_identity`. Needs neither the face analyzer nor SigLIP."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    where = path.name
    again = "save the person again with Save WithAnyone Identity"
    if not path.is_file():
        raise IdentityFileError(f"identity file not found: {path}")
    if path.suffix.lower() != SUFFIX:
        raise IdentityFileError(f"{where}: saved identities are {SUFFIX} files (pickles are never read)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            names = set(fh.keys())
            tensors = {n: fh.get_tensor(n) for n in TENSOR_NAMES if n in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise IdentityFileError(f"{where} is not a readable safetensors file ({exc}): it is damaged or not a saved "
                                f"identity; {again}") from exc
    if metadata.get("format") != FORMAT:
        found = f"format {metadata['format']!r}" if "format" in metadata else "no WithAnyone identity metadata"
        raise IdentityFileError(f"{where} is not a saved WithAnyone identity ({found}; model files such as the "
                                "adapter belong in models/withanyone/, not in its identities/ folder)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise IdentityFileError(f"{where}: format_version {metadata.get('format_version')!r} is not a number; "
                                f"{again}") from None
    if version > FORMAT_VERSION:
        raise IdentityFileError(f"{where} was written in identity format {version} by pack version "
                                f"{metadata.get('pack_version', 'unknown')}; this pack ({pack_version()}) reads "
                                f"format {FORMAT_VERSION} and older: update the pack")
    if version < 1:
        raise IdentityFileError(f"{where}: unknown identity format {version}; {again}")
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if missing:
        raise IdentityFileError(f"{where} lacks the tensor(s) {', '.join(missing)}: it is damaged; {again}")
    tensors = {n: t.to(torch.float32) if t.dtype != torch.float32 else t for n, t in tensors.items()}
    photos = _photos_from(metadata.get("photos", "[]"), where)
    _check(tensors, len(photos), f"{where} is damaged")
    if metadata.get("content_sha256") != _content_sha256(tensors):
        raise IdentityFileError(f"{where}: its tensors do not match their checksum (the file was changed or "
                                f"damaged); {again}")
    try:
        skipped = tuple(int(i) for i in json.loads(metadata.get("skipped", "[]")))
    except (ValueError, TypeError) as exc:
        raise IdentityFileError(f"{where}: its skipped-photo list is damaged; {again}") from exc
    return SavedIdentity(name=metadata.get("name", path.stem), arcface=tensors["arcface"], siglip=tensors["siglip"],
                         photo_embeddings=tensors["photo_embeddings"], photos=photos, skipped=skipped,
                         pack_version=metadata.get("pack_version", "unknown"), created=metadata.get("created", ""),
                         format_version=version)
