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
import unicodedata
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
# The values an encoded person may hold. Real antelopev2 (glintr100) raw ArcFace embeddings have norms of about
# 15-35 on real photos (blurred or small faces run lower). The tiny stand-in recognizer of
# withanyone_core/testing is scaled to the same range (19.7-21.1 on its painted faces), so it cannot measure the
# real range. 1-100 leaves a wide margin on both sides and still refuses what is no embedding (zeros, x1e30).
ARCFACE_NORM_RANGE = (1.0, 100.0)
# SigLIP features are the vision tower's last_hidden_state, which ends in a LayerNorm (post_layernorm): each value
# is a normalised activation times a learned scale, tens at most (the tiny stand-in's, with unit scale, stay below
# sqrt(768) = 27.7). 1e4 leaves a wide margin and refuses values that overflow the adapter's LayerNorms.
SIGLIP_MAX_ABS = 1e4
# names: the file is <name>.safetensors and is written through a temporary .<name>.XXXXXXXX.tmp beside it, which
# must fit the 255-byte file name limit of common file systems
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200


class IdentityFileError(ValueError):
    """A saved-identity file that cannot be read or written, with a message saying what to do."""


class IdentityValueError(ValueError):
    """An encoded person whose values cannot be an identity (non-finite, or far outside what the encoders give)."""


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
    digest = hashlib.sha256("{}x{}x{}:".format(*pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def normalize_name(name: str) -> str:
    """A person's name as it is kept: Unicode NFC (``Zoë`` typed as one letter or as ``o`` + combining
    diaeresis is one person), surrounding spaces removed, at most :data:`MAX_NAME_CHARS` characters."""
    if not isinstance(name, str):
        raise IdentityFileError(f"the name must be text, got {type(name).__name__}")
    name = unicodedata.normalize("NFC", name).strip()
    if len(name) > MAX_NAME_CHARS:
        raise IdentityFileError(
            f"the name {name[:24]!r}... is {len(name)} characters long: use at most {MAX_NAME_CHARS}"
        )
    return name


def file_name(name: str) -> str:
    """A person's name -> its file name: letters, digits, ``-``, ``_``, ``.`` and spaces kept, anything else ``_``
    (after :func:`normalize_name`)."""
    stem = normalize_name(name)
    if stem.lower().endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    stem = re.sub(r"[^\w\-. ]", "_", stem).strip(" .")
    if not stem:
        raise IdentityFileError(f"name {name!r} gives no file name: use letters or digits, e.g. 'alice'")
    size = len(stem.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise IdentityFileError(
            f"the name {stem[:24]!r}... takes {size} bytes as a file name (UTF-8), more than "
            f"the {MAX_NAME_BYTES} a file name may have here: use a shorter name"
        )
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


def value_problems(name: str, tensor: torch.Tensor, kind: str) -> list[str]:
    """What makes ``tensor`` impossible as an encoder's output: ``kind`` ``"arcface"`` (raw embeddings, one per
    row: norm within :data:`ARCFACE_NORM_RANGE`) or ``"siglip"`` (features: every value within
    :data:`SIGLIP_MAX_ABS`). Non-finite values are named first."""
    tensor = torch.as_tensor(tensor).detach().float()
    if not tensor.numel():
        return []
    if not torch.isfinite(tensor).all():
        return [f"{name} holds NaN or infinite values"]
    if kind == "arcface":
        norms = torch.linalg.vector_norm(tensor.reshape(-1, tensor.shape[-1]).double(), dim=-1)
        low, high = ARCFACE_NORM_RANGE
        bad = [(k, float(n)) for k, n in enumerate(norms) if not low <= float(n) <= high]
        if bad:
            k, norm = bad[0]
            which = f" (row {k + 1})" if norms.numel() > 1 else ""
            return [
                f"{name}{which} has norm {norm:.3g}, outside {low:g}-{high:g} (a raw ArcFace embedding's norm is "
                f"about 15-35)"
            ]
    elif kind == "siglip":
        peak = float(tensor.abs().max())
        if peak > SIGLIP_MAX_ABS:
            return [
                f"{name} holds a value of magnitude {peak:.3g}, above {SIGLIP_MAX_ABS:g} (SigLIP features are "
                f"LayerNorm outputs, tens at most)"
            ]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return []


def check_encoded(arcface, siglip, who: str) -> None:
    """Refuse an encoded person (raw ArcFace ``[512]``, SigLIP ``[tokens, dim]`` or None) whose values no encoder
    gives: non-finite, or far out of range (:func:`value_problems`)."""
    problems = value_problems("its ArcFace embedding", arcface, "arcface")
    if siglip is not None:
        problems += value_problems("its SigLIP features", siglip, "siglip")
    if problems:
        raise IdentityValueError(
            f"{who}: " + "; ".join(problems) + ": this is not what antelopev2 and SigLIP give; "
            "check the face analyzer and SigLIP models (re-download them), or save the person "
            "again from photos"
        )


def _check(identity_tensors: dict[str, torch.Tensor], photos: int, where: str, advice: str) -> None:
    arcface, siglip, per_photo = (identity_tensors[n] for n in TENSOR_NAMES)
    problems = []
    if tuple(arcface.shape) != (ARCFACE_DIM,):
        problems.append(f"arcface has shape {tuple(arcface.shape)}, expected ({ARCFACE_DIM},)")
    if siglip.ndim != 2 or 0 in siglip.shape:
        problems.append(f"siglip has shape {tuple(siglip.shape)}, expected [tokens, dim]")
    if per_photo.ndim != 2 or per_photo.shape[1:] != (ARCFACE_DIM,) or per_photo.shape[0] != photos or photos < 1:
        problems.append(
            f"photo_embeddings has shape {tuple(per_photo.shape)}, expected ({photos}, {ARCFACE_DIM}) "
            f"for {photos} photo(s)"
        )
    if not problems:
        for name in TENSOR_NAMES:
            problems += value_problems(name, identity_tensors[name], "siglip" if name == "siglip" else "arcface")
    if problems:
        raise IdentityFileError(f"{where}: " + "; ".join(problems) + f"; {advice}")


def save_identity(path: str | os.PathLike, identity: SavedIdentity) -> Path:
    """Write ``identity`` to ``path`` (atomically: a half-written file never replaces a good one)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {n: _as_float32(n, getattr(identity, n)) for n in TENSOR_NAMES}
    _check(
        tensors,
        len(identity.photos),
        f"cannot save {identity.name!r}",
        "check the face analyzer (antelopev2) and SigLIP models: re-download them if they were changed",
    )
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": identity.name,
        "pack_version": identity.pack_version,
        "created": identity.created,
        "photos": json.dumps(
            [
                {
                    "image_index": p.image_index,
                    "bbox": [float(v) for v in p.bbox],
                    "score": None if p.score is None else float(p.score),
                    "masked": bool(p.masked),
                    "image_sha256": p.image_sha256,
                }
                for p in identity.photos
            ]
        ),
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
        return tuple(
            SavedPhoto(
                int(e["image_index"]),
                tuple(float(v) for v in e["bbox"]),
                None if e.get("score") is None else float(e["score"]),
                bool(e.get("masked", False)),
                e.get("image_sha256"),
            )
            for e in entries
        )
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
        raise IdentityFileError(
            f"{where} is not a readable safetensors file ({exc}): it is damaged or not a saved identity; {again}"
        ) from exc
    if metadata.get("format") != FORMAT:
        found = f"format {metadata['format']!r}" if "format" in metadata else "no WithAnyone identity metadata"
        raise IdentityFileError(
            f"{where} is not a saved WithAnyone identity ({found}; model files such as the "
            "adapter belong in models/withanyone/, not in its identities/ folder)"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise IdentityFileError(
            f"{where}: format_version {metadata.get('format_version')!r} is not a number; {again}"
        ) from None
    if version > FORMAT_VERSION:
        raise IdentityFileError(
            f"{where} was written in identity format {version} by pack version "
            f"{metadata.get('pack_version', 'unknown')}; this pack ({pack_version()}) reads "
            f"format {FORMAT_VERSION} and older: update the pack"
        )
    if version < 1:
        raise IdentityFileError(f"{where}: unknown identity format {version}; {again}")
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if missing:
        raise IdentityFileError(f"{where} lacks the tensor(s) {', '.join(missing)}: it is damaged; {again}")
    tensors = {n: t.to(torch.float32) if t.dtype != torch.float32 else t for n, t in tensors.items()}
    photos = _photos_from(metadata.get("photos", "[]"), where)
    _check(tensors, len(photos), f"{where} is damaged", again)
    if metadata.get("content_sha256") != _content_sha256(tensors):
        raise IdentityFileError(
            f"{where}: its tensors do not match their checksum (the file was changed or damaged); {again}"
        )
    try:
        skipped = tuple(int(i) for i in json.loads(metadata.get("skipped", "[]")))
    except (ValueError, TypeError) as exc:
        raise IdentityFileError(f"{where}: its skipped-photo list is damaged; {again}") from exc
    return SavedIdentity(
        name=metadata.get("name", path.stem),
        arcface=tensors["arcface"],
        siglip=tensors["siglip"],
        photo_embeddings=tensors["photo_embeddings"],
        photos=photos,
        skipped=skipped,
        pack_version=metadata.get("pack_version", "unknown"),
        created=metadata.get("created", ""),
        format_version=version,
    )
