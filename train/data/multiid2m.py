"""MultiID-2M: the authors' released dataset, streamed from webdataset-layout tars.

Layout (``MultiID-2M/README.md``, the authors' ``negativeloader_full.py``): each sample is
``<key>.jpg`` + ``<key>.json`` + ``<key>.npy`` next to each other in a tar. The ``.npy`` is a
*pickled* dict (``np.save`` of a dict): ``bboxes`` ([x1, y1, x2, y2] in the original photo's
pixels) and ``embeddings`` (or ``embedding``: one raw antelopev2 vector per box, box order).
The JSON holds ``caption_en``, ``crop`` ([x1, y1, x2, y2] of the photo inside the original:
boxes are shifted by its corner), the names (``name`` list, else ``names``, else
``keyword`` split on spaces; ``none`` / missing: unidentifiable), ``url``, ``ram_score``,
``aesthetics_score``. References: ``<refs>/<name>/*.{jpg,json,npy}`` (untarred, or read from
``ref/tars/*.tar`` in place: :mod:`train.data.multiid2m_refs`); cluster centres:
``<centres>/<name>.npy`` or ``ref/cluster_centers.tar``.

Pickles are never loaded with :mod:`pickle` defaults: :func:`load_npy` accepts only dicts,
lists, tuples, numbers, strings and numpy arrays, and refuses any other global *before*
anything is called (:class:`UnsafePickleError` names the shard and member).

The stream (:class:`MultiID2MStream`) is an ``IterableDataset`` yielding collated batches of
one bucket and person count. Shards are split over (rank, DataLoader worker) slots:
shard-wise when there are at least as many shards as slots, else sample-wise (every slot
reads every shard and keeps every n-th sample); never a sample twice per epoch. The order
(shard shuffle, sample buffer) and every random choice of an item come from the seed, the
epoch and the slot/sample, so a resumed stream skips the batches already consumed (without
decoding their images) and continues bit-identically.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import DataOptions, collate, cosine, training_caption
from .images import crop_to_bucket, faces_inside, square_crop
from .records import EMBEDDING_DIM, box_problem, embedding_problem

if TYPE_CHECKING:
    from .multiid2m_refs import ReferenceTars

logger = logging.getLogger(__name__)

COMPRESSED_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
# the authors keep samples with 1..5 faces (negativeloader_full.process_item)
MAX_PERSONS = 5
# the authors build each identity's negative set from at most 200 reference embeddings
MAX_REFS_PER_IDENTITY = 200


class ShardFormatError(ValueError):
    """A shard member that does not follow the MultiID-2M layout; the message names shard and member.

    ``reason`` is the short name a run's summary counts it under (see :mod:`train.data.skips`).
    """

    def __init__(self, message: str, reason: str = "format"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # raised in DataLoader workers: keep the reason across the pickle
        return (type(self), (str(self), self.reason))


class UnsafePickleError(ShardFormatError):
    """A pickle that asks for anything but numpy's array globals: refused, nothing was run."""

    def __init__(self, message: str, reason: str = "unsafe_pickle"):
        super().__init__(message, reason)


def check_boxes(boxes: np.ndarray, width: int, height: int, where: str) -> None:
    """Raise :class:`ShardFormatError` unless every ``[x1, y1, x2, y2]`` is finite, not inverted, and inside
    the ``width x height`` photo (up to :data:`~train.data.records.BOX_MARGIN` of the box's size)."""
    for box in boxes:
        problem = box_problem(box, width, height)
        if problem is not None:
            raise ShardFormatError(f"{where}: {problem[1]} (after its crop)", problem[0])


def check_embeddings(embeddings: np.ndarray, where: str) -> None:
    for embedding in embeddings:
        problem = embedding_problem(embedding)
        if problem is not None:
            raise ShardFormatError(f"{where}: {problem[1]}", problem[0])


# everything np.save of a dict of arrays/lists/numbers needs, and nothing that can run code
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, where: str):
        super().__init__(fh)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.where}: the pickle asks for {module}.{name}; only dicts, lists, tuples, numbers, strings "
                "and numpy arrays are accepted, so it was refused without running it. Do not train on this shard; "
                "re-create it with `python train/prepare.py --format multiid2m`")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: the pickle uses persistent ids; refused")


def _check_plain(value, where: str):
    """The unpickled value may hold only plain data (an object array could hold other types)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, where)
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            for v in value.ravel():
                _check_plain(v, where)
    elif not isinstance(value, (str, bytes, int, float, bool, type(None), np.generic)):
        raise UnsafePickleError(f"{where}: unpickled a {type(value).__name__}; only plain data is accepted")


def load_npy(data: bytes, where: str):
    """A ``.npy`` file's content: a plain array, or the object a pickled ``.npy`` holds (``.item()``)."""
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: not a .npy file ({exc})") from exc
    if not dtype.hasobject:
        fh.seek(0)
        return np.lib.format.read_array(fh, allow_pickle=False)
    try:
        array = _RestrictedUnpickler(fh, where).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or garbled pickle data
        raise ShardFormatError(f"{where}: unreadable pickle ({type(exc).__name__}: {exc})") from exc
    _check_plain(array, where)
    if isinstance(array, np.ndarray) and array.shape == () and array.dtype.hasobject:
        return array.item()
    return array


def save_pickled_npy(value: dict) -> bytes:
    """The authors' ``np.save(f, dict, allow_pickle=True)`` bytes (used only to write the released layout)."""
    buf = io.BytesIO()
    np.save(buf, np.array(value, dtype=object), allow_pickle=True)
    return buf.getvalue()


# ------------------------------------------------------------------ field rules
@dataclass(frozen=True)
class StreamPerson:
    name: str | None  # None: unidentifiable
    box: tuple[float, float, float, float]  # in the (cropped) photo's pixels
    embedding: np.ndarray


@dataclass(frozen=True)
class StreamSample:
    shard: str
    key: str
    image: bytes
    width: int
    height: int
    caption: str
    quality: float  # aesthetics_score, 1.0 when absent
    persons: tuple[StreamPerson, ...]

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"


def person_names(meta: dict, count: int) -> list[str | None]:
    """The authors' name rule: ``name`` (list), else ``names``, else ``keyword`` split on spaces."""
    if "name" in meta:
        raw = meta["name"]
    elif "names" in meta:
        raw = meta["names"]
    else:
        raw = meta.get("keyword")
    if isinstance(raw, str):
        raw = raw.split(" ") if "name" not in meta else [raw]
    names = [str(n).strip() for n in (raw or [])][:count]
    names = [None if not n or n.lower() == "none" else n for n in names]
    return names + [None] * (count - len(names))


def embeddings_of(arrays: dict, where: str) -> np.ndarray:
    value = arrays.get("embeddings", arrays.get("embedding"))
    if value is None:
        raise ShardFormatError(f"{where}: no 'embeddings' (or 'embedding') in the .npy", "embedding_shape")
    try:
        emb = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ShardFormatError(f"{where}: embeddings are not numbers ({exc})", "embedding_shape") from exc
    if emb.size == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    if emb.shape[-1] != EMBEDDING_DIM or emb.ndim > 2:
        raise ShardFormatError(f"{where}: embeddings of shape {list(emb.shape)}; expected [faces, {EMBEDDING_DIM}] "
                               "(raw antelopev2 vectors)", "embedding_shape")
    emb = emb.reshape(-1, EMBEDDING_DIM)
    check_embeddings(emb, where)
    return emb


def _image_size(data: bytes, where: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as the photo is shown (EXIF orientation applied), from the header only."""
    from withanyone_core.faces import ImageReadError, ImageTooLargeError, image_size

    try:
        return image_size(data, where, max_pixels)
    except ImageTooLargeError as exc:
        raise ShardFormatError(str(exc), "image_too_large") from exc
    except ImageReadError as exc:
        raise ShardFormatError(f"{where}: the .jpg is not an image ({exc})", "image_unreadable") from exc


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _boxes_of(value, where: str) -> np.ndarray:
    try:
        boxes = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShardFormatError(f"{where}: bboxes are not numbers ({exc})", "box_shape") from exc
    if boxes.size % 4 or (boxes.ndim and boxes.shape[-1] != 4 and boxes.size):
        raise ShardFormatError(f"{where}: bboxes of shape {list(boxes.shape)}; expected [faces, 4] "
                               "([x1, y1, x2, y2] each)", "box_shape")
    return boxes.reshape(-1, 4)


def _crop_of(meta: dict, width: int, height: int, where: str) -> tuple[float, float]:
    """The corner of the photo inside the original (``crop`` = [x1, y1, x2, y2]); (0, 0) without one."""
    crop = meta.get("crop")
    if crop is None or (isinstance(crop, list) and not crop):
        return 0.0, 0.0
    if not isinstance(crop, list) or len(crop) != 4 or not all(_is_number(v) for v in crop):
        raise ShardFormatError(f"{where}: crop must be [x1, y1, x2, y2] (4 numbers), got {json.dumps(crop)[:80]}",
                               "crop")
    x1, y1, x2, y2 = (float(v) for v in crop)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise ShardFormatError(f"{where}: crop {crop} must be finite, non-negative, with x2 > x1 and y2 > y1",
                               "crop")
    return x1, y1


def parse_sample(shard: str, key: str, members: dict[str, bytes], max_pixels: int | None = None) -> StreamSample:
    """One sample, validated: JSON shape, crop, boxes (finite, not inverted, inside the photo), embeddings
    (shape, finite, plausible norm), image header (decodable size, at most ``max_pixels``). Anything else
    raises :class:`ShardFormatError` naming shard and member, with a ``reason``."""
    where = f"{shard}:{key}"
    for suffix in ("jpg", "json", "npy"):
        if suffix not in members:
            raise ShardFormatError(f"{where}: no {key}.{suffix} (a sample is .jpg + .json + .npy)", "missing_member")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{where}.json: not valid JSON ({exc})", "json") from exc
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}.json: expected a JSON object ({{\"caption_en\": ..., \"crop\": ...}}), got "
                               f"a {type(meta).__name__}", "json")
    caption = meta.get("caption_en")
    if caption is not None and not isinstance(caption, str):
        raise ShardFormatError(f"{where}.json: caption_en must be a string, got {json.dumps(caption)[:80]}", "json")
    for field_name in ("name", "names", "keyword"):
        if field_name in meta and not (meta[field_name] is None or isinstance(meta[field_name], str)
                                       or (isinstance(meta[field_name], list)
                                           and all(isinstance(n, (str, type(None))) for n in meta[field_name]))):
            raise ShardFormatError(f"{where}.json: {field_name} must be a string or a list of strings, got "
                                   f"{json.dumps(meta[field_name])[:80]}", "json")
    quality = meta.get("aesthetics_score")
    if quality is not None and not (_is_number(quality) and math.isfinite(quality)):
        raise ShardFormatError(f"{where}.json: aesthetics_score must be a finite number, got "
                               f"{json.dumps(quality)[:80]}", "json")
    arrays = load_npy(members["npy"], f"{where}.npy")
    if not isinstance(arrays, dict) or "bboxes" not in arrays:
        raise ShardFormatError(f"{where}.npy: expected a dict with 'bboxes' and 'embeddings'", "npy")
    boxes = _boxes_of(arrays["bboxes"], f"{where}.npy")
    embeddings = embeddings_of(arrays, f"{where}.npy")
    if len(embeddings) != len(boxes):
        raise ShardFormatError(f"{where}.npy: {len(boxes)} boxes but {len(embeddings)} embeddings", "embedding_shape")
    width, height = _image_size(members["jpg"], f"{where}.jpg", max_pixels)
    cx, cy = _crop_of(meta, width, height, f"{where}.json")
    boxes = boxes - np.array([cx, cy, cx, cy], dtype=np.float64)
    check_boxes(boxes, width, height, where)
    names = person_names(meta, len(boxes))
    persons = tuple(StreamPerson(n, tuple(float(v) for v in b), e) for n, b, e in zip(names, boxes, embeddings))
    return StreamSample(shard, key, members["jpg"], int(width), int(height), caption or "",
                        float(quality) if quality is not None else 1.0, persons)


# ------------------------------------------------------------------ shards
def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths of one or more globs (``,`` separates globs in one string)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    matched = {path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern.strip()))}
    found = sorted(path for path in matched if path.endswith(".tar"))
    compressed = sorted(path for path in matched if path.lower().endswith(COMPRESSED_SHARD_SUFFIXES))
    if compressed and found:
        logger.warning("%d compressed shard(s) matching %s are left out (first: %s): only plain .tar shards are "
                       "read; gunzip them to .tar to train on them", len(compressed), list(patterns), compressed[0])
    elif compressed:
        first = compressed[0]
        raise FileNotFoundError(
            f"compressed {first[first.lower().rindex('.tar'):]} shards are not supported: gunzip them to .tar "
            f"(e.g. `gunzip -k {first}`; bzip2/xz/zstd: `bunzip2 -k`, `unxz -k`, `unzstd`) and point "
            f"data.multiid2m.shards at the .tar files ({len(compressed)} compressed shard(s) match "
            f"{list(patterns)}). Shards are streamed many times per run; a plain tar is read without decompressing")
    if not found:
        raise FileNotFoundError(f"no .tar shard matches {list(patterns)}: point data.multiid2m.shards at the "
                                "MultiID-2M tars (e.g. /data/MultiID-2M/train_rec/re_*.tar)")
    return found


def _is_plain_tar(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(6)
    return not (head.startswith((b"\x1f\x8b", b"BZh", b"\x28\xb5\x2f\xfd")) or head == b"\xfd7zXZ\x00")


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of consecutive members sharing a key (webdataset's grouping rule).

    A truncated or unreadable tar raises :class:`ShardFormatError` (reason ``shard_unreadable``)
    naming the shard and the last sample read whole; the samples before it were yielded.
    """
    key, members = None, {}
    last_whole = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                prefix = name[: len(name) - len(base)]
                stem, suffix = base.split(".", 1)
                member_key = prefix + stem
                if member_key != key:
                    if key is not None:
                        yield key, members
                        last_whole = key
                    key, members = member_key, {}
                members[suffix.lower()] = tar.extractfile(info).read()
            end = tar.offset
        if _is_plain_tar(path) and os.path.getsize(path) - end < tarfile.BLOCKSIZE:
            # cut at a member boundary: tarfile ends quietly, but a whole tar ends with zero blocks after its members
            raise tarfile.ReadError(f"no end-of-archive block after byte {end} of {os.path.getsize(path)}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        after = f"after sample {last_whole}" if last_whole is not None else "before its first sample"
        lost = f"; sample {key} and everything after it are lost" if key is not None else ""
        raise ShardFormatError(f"{path}: unreadable tar {after} ({type(exc).__name__}: {exc}){lost}. "
                               "The shard is truncated or damaged: copy it again (compare its size or checksum "
                               "with the source)", "shard_unreadable") from exc
    if key is not None:
        yield key, members


def parsed_samples(shard: str, what: str, max_pixels: int | None = None,
                   on_bad: Callable[[ShardFormatError], bool | None] | None = None,
                   ) -> Iterator[tuple[str, StreamSample]]:
    """(key, sample) of one shard for the passes outside the stream (landmarks, negatives, the sample step).

    A bad sample is skipped with a warning naming it (``what`` says which pass), an unreadable rest of
    the shard ends it with one; ``on_bad`` sees each of those errors (returning True ends the pass). A pickle that would run code still
    stops everything (:class:`UnsafePickleError`)."""
    samples = iter_tar_samples(shard)
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            return
        except ShardFormatError as exc:
            logger.warning("%s: skipping the rest of shard %s: %s", what, shard, exc)
            if on_bad is not None:
                on_bad(exc)
            return
        try:
            sample = parse_sample(shard, key, members, max_pixels)
        except UnsafePickleError:
            raise
        except ShardFormatError as exc:
            logger.warning("%s: skipping %s:%s (%s)", what, shard, key, exc)
            if on_bad is not None and on_bad(exc):
                return
            continue
        yield key, sample


# ------------------------------------------------------------------ references, landmarks, negatives
def reference_entry(npy: bytes, meta: bytes | None, where: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A reference's (first embedding, first box from its JSON's ``bboxes``, else its .npy's)."""
    arrays = load_npy(npy, where)
    if not isinstance(arrays, dict):
        raise ShardFormatError(f"{where}: expected a dict with 'embeddings'", "npy")
    embeddings = embeddings_of(arrays, where)
    if not len(embeddings):
        raise ShardFormatError(f"{where}: no embedding in the .npy", "embedding_shape")
    boxes = None
    if meta is not None:
        try:
            parsed = json.loads(meta.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardFormatError(f"{where}: its .json is not valid JSON ({exc})", "json") from exc
        if not isinstance(parsed, dict):
            raise ShardFormatError(f"{where}: its .json must be an object, got a {type(parsed).__name__}", "json")
        boxes = parsed.get("bboxes")
    if boxes is None:
        boxes = arrays.get("bboxes")
    box = None
    if boxes is not None and np.size(boxes):
        box = tuple(float(v) for v in _boxes_of(boxes, where)[0])
        problem = box_problem(box, math.inf, math.inf)  # finite, not inverted (its photo's size is checked on use)
        if problem is not None:
            raise ShardFormatError(f"{where}: {problem[1]}", problem[0])
    return embeddings[0], box


class ReferenceFolder:
    """``<root>/<name>/*.npy`` (+ .jpg, .json): the authors' per-identity reference photos, untarred.

    One interface with :class:`train.data.multiid2m_refs.ReferenceTars` (the same photos read
    from ``ref/tars/*.tar`` directly): ``names()``, ``files(name)`` (handles, in file-name
    order), ``read(handle)``, ``image(handle)``, ``description`` and ``fingerprint()``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"reference folder {self.root} does not exist (untar ref/tars/ into it, or "
                                    "set data.multiid2m.refs to the tars: /data/MultiID-2M/ref/tars/*.tar)")
        self._files: dict[str, list[Path]] = {}

    @property
    def description(self) -> str:
        return str(self.root)

    def fingerprint(self) -> str:
        """What the negative pool's cache name is keyed by (the folder, as before tars were read)."""
        return str(self.root)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def files(self, name: str) -> list[Path]:
        if name not in self._files:
            folder = self.root / name
            self._files[name] = sorted(folder.glob("*.npy")) if folder.is_dir() else []
        return self._files[name]

    def read(self, npy: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
        """(first embedding, first box from the JSON's ``bboxes``, else the .npy's)."""
        meta_path = npy.with_suffix(".json")
        return reference_entry(npy.read_bytes(), meta_path.read_bytes() if meta_path.is_file() else None, str(npy))

    def image(self, npy: Path, max_pixels: int | None = None) -> np.ndarray:
        """The reference photo beside the .npy (``<stem>.jpg``), RGB uint8, upright."""
        from withanyone_core.faces import load_image

        return load_image(npy.with_suffix(".jpg"), max_pixels)


def read_cluster_centres(source: str | os.PathLike, skipped: list | None = None) -> dict[str, np.ndarray]:
    """``<folder>/<name>.npy``, or the members ``[.../]<name>.npy`` of ``ref/cluster_centers.tar``
    (one streaming pass, never untarred) -> the identity's 512-d centre (plain or pickled .npy).
    A centre that is not 512 finite numbers of a plausible norm is skipped with a warning naming it
    (and appended to ``skipped`` as (where, reason, message))."""
    found: dict[str, tuple[bytes, str]] = {}
    source = Path(source)
    if source.is_file():
        try:
            with tarfile.open(source, mode="r|*") as tar:
                for info in tar:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isfile() and base.endswith(".npy") and not base.startswith("."):
                        found[base[: -len(".npy")]] = (tar.extractfile(info).read(), f"{source}:{info.name}")
        except tarfile.TarError as exc:
            raise ShardFormatError(f"{source}: not a readable tar ({exc}); data.multiid2m.cluster_centers takes "
                                   "ref/cluster_centers.tar or the folder it untars into") from exc
    else:
        for path in sorted(source.glob("*.npy")):
            found[path.stem] = (path.read_bytes(), str(path))
    out = {}
    for name in sorted(found):
        data, where = found[name]
        try:
            value = load_npy(data, where)
            try:
                centre = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ShardFormatError(f"{where}: not an array of numbers ({exc})", "embedding_shape") from exc
            if centre.size < EMBEDDING_DIM or centre.size % EMBEDDING_DIM:
                raise ShardFormatError(f"{where}: a cluster centre of shape {list(centre.shape)}; expected "
                                       f"[{EMBEDDING_DIM}] (or [k, {EMBEDDING_DIM}]: the first is used)",
                                       "embedding_shape")
            centre = centre.reshape(-1, EMBEDDING_DIM)[0]
            check_embeddings(centre[None], where)
        except UnsafePickleError:
            raise
        except ShardFormatError as exc:
            logger.warning("cluster centres: skipping %s (%s): %s", name, exc.reason, exc)
            if skipped is not None:
                skipped.append((where, exc.reason, str(exc)))
            continue
        out[name] = centre
    return out


def landmark_file(cache_dir: str | os.PathLike, shard: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(shard).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(shard).stem}-{digest}.landmarks.json"


def detect_landmarks(shards: Sequence[str], cache_dir: str | os.PathLike, detector, iou_min: float = 0.3,
                     max_pixels: int | None = None) -> int:
    """Detect the GT faces' 5 landmarks once per shard and cache them (the release has none).

    Each GT box takes the detection that overlaps it most (IoU >= ``iou_min``); a box with
    none gets ``null`` and its face leaves the GT-aligned ID loss. Returns shards detected now.
    """
    from withanyone_core.faces import ImageReadError, decode_image

    from ..losses import box_iou

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    done = 0
    for shard in shards:
        target = landmark_file(cache_dir, shard)
        if target.is_file() and read_landmark_file(target) is not None:
            continue
        table: dict[str, list] = {}
        truncated: list[ShardFormatError] = []

        def note_truncated(exc: ShardFormatError) -> None:
            if exc.reason == "shard_unreadable":  # what was read is used, not cached (re-read next run)
                truncated.append(exc)

        for key, sample in parsed_samples(shard, "landmarks", max_pixels, note_truncated):
            try:
                image = decode_image(sample.image, f"{sample.where}.jpg", max_pixels)
                faces = detector.detect(image)
            except (ImageReadError, OSError, ValueError) as exc:
                logger.warning("landmarks: skipping %s:%s (%s)", shard, key, exc)
                continue
            gt = np.array([p.box for p in sample.persons], dtype=np.float64).reshape(-1, 4)
            found = np.array([f.bbox[:4] for f in faces], dtype=np.float64).reshape(-1, 4)
            rows = [None] * len(gt)
            if len(gt) and len(found):
                iou = box_iou(gt, found)
                for i in range(len(gt)):
                    j = int(np.argmax(iou[i]))
                    if iou[i, j] >= iou_min:
                        rows[i] = [[float(x), float(y)] for x, y in faces[j].kps]
            table[key] = rows
        if truncated:
            fallback = Path(cache_dir) / "partial"
            fallback.mkdir(exist_ok=True)
            target = fallback / target.name  # read by this run, replaced once the shard reads whole
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"shard": os.path.abspath(shard), "landmarks": table}))
        os.replace(tmp, target)
        done += 1
    return done


def _landmark_row(row):
    """A cached row: None, or 5 finite [x, y] points (else None: the face leaves the GT-aligned ID loss)."""
    if row is None:
        return None
    try:
        points = np.asarray(row, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return row if points.shape == (5, 2) and np.isfinite(points).all() else False


def read_landmark_file(path: Path) -> dict[str, list] | None:
    """A shard's cached landmarks, validated; None (with a warning naming it) for a damaged file."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))["landmarks"]
        if not isinstance(table, dict) or not all(isinstance(rows, list) for rows in table.values()):
            raise ValueError("expected {key: [rows]}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("landmark cache %s is unreadable (%s); it is detected again", path, exc)
        return None
    out = {}
    for key, rows in table.items():
        checked = [_landmark_row(r) for r in rows]
        if any(r is False for r in checked):
            logger.warning("landmark cache %s: %s has a row that is not 5 finite [x, y] points; its faces leave "
                           "the GT-aligned ID loss", path, key)
            checked = [None if r is False else r for r in checked]
        out[key] = checked
    return out


def load_landmarks(shards: Sequence[str], cache_dir: str | os.PathLike | None) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    if cache_dir is None:
        return out
    for shard in shards:
        path = landmark_file(cache_dir, shard)
        if not path.is_file():
            path = Path(cache_dir) / "partial" / path.name  # a truncated shard's samples read so far
        table = read_landmark_file(path) if path.is_file() else None
        for key, rows in (table or {}).items():
            out[(shard, key)] = rows
    return out


def _count_reasons(bad) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, reason, _ in bad:
        out[reason] = out.get(reason, 0) + 1
    return out


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:7], "big")


class IdentityNumbers:
    """Names -> identity ids shared by every process: listed names 0..K-1, others a stable hash above.

    Unidentifiable persons get an id of their own (negative, from shard and key), so they are
    never another sample's positive nor excluded from anyone's negatives.
    """

    def __init__(self, names: Sequence[str]):
        self.ids = {name: i for i, name in enumerate(sorted(set(names)))}

    def of(self, name: str | None, sample: StreamSample, person: int) -> int:
        if name is None:
            return -1 - _stable_id(f"{sample.where}#{person}")
        return self.ids.get(name, (1 << 56) + _stable_id(name))


def negative_pool_tensors(refs: ReferenceFolder | ReferenceTars | None, centres: dict[str, np.ndarray],
                          numbers: IdentityNumbers, shards: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and identity ids of the negative pool.

    The authors' pool: up to 200 reference embeddings per identity; an identity without
    references contributes its cluster centre. Without either, the shards' own faces
    (named ones under their name, each unidentifiable face as an identity of its own).
    """
    embs, ids = [], []
    names = set(refs.names() if refs else []) | set(centres)
    for name in sorted(names):
        files = refs.files(name)[:MAX_REFS_PER_IDENTITY] if refs else []
        got = 0
        for path in files:
            try:
                embs.append(refs.read(path)[0])
            except (ShardFormatError, OSError, ValueError) as exc:
                if isinstance(exc, UnsafePickleError):
                    raise
                logger.warning("negative pool: skipping %s (%s)", path, exc)
                continue
            ids.append(numbers.ids.get(name, (1 << 56) + _stable_id(name)))
            got += 1
        if not got and name in centres:
            embs.append(centres[name])
            ids.append(numbers.ids.get(name, (1 << 56) + _stable_id(name)))
    if not embs:
        for shard in shards:
            for _, sample in parsed_samples(shard, "negative pool"):
                for i, person in enumerate(sample.persons):
                    embs.append(person.embedding)
                    ids.append(numbers.of(person.name, sample, i))
    if not embs:
        raise ValueError("no embedding for the negative pool: give data.multiid2m.refs or cluster_centers")
    return torch.from_numpy(np.stack(embs).astype(np.float32)), torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------ the stream
class MultiID2MStream(torch.utils.data.IterableDataset):
    """Collated batches from MultiID-2M shards, infinite (epoch after epoch), resumable.

    ``skip_batches``: batches this rank already consumed; with DataLoader workers, batch
    ``k`` of a rank comes from the logical worker ``k % num_workers`` (the DataLoader's
    round-robin over infinite workers), so each worker skips its own share. A resume needs the same number
    of ranks and workers (the trainer checks it).
    """

    def __init__(self, shards: Sequence[str], options: DataOptions, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 refs: ReferenceFolder | ReferenceTars | None = None, numbers: IdentityNumbers | None = None,
                 landmarks: dict | None = None, skip_batches: int = 0):
        super().__init__()
        self.shards = list(shards)
        self.options, self.batch_size, self.seed = options, batch_size, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.refs, self.numbers = refs, numbers or IdentityNumbers([])
        self.landmarks = landmarks or {}
        self.skip_batches = skip_batches

    # ---- order
    def _slot(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[str, str, dict]]:
        """(shard, key, members) of one epoch of one slot, shuffled by shard order and the buffer."""
        order = list(self.shards)
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        if len(order) >= slots:
            mine, every = order[slot::slots], None
        else:
            mine, every = order, slots
        rng = random.Random(f"{self.seed}:buffer:{epoch}:{slot}")
        buffer: list = []
        counter = 0
        for shard in mine:
            samples = iter_tar_samples(shard)
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    break
                except ShardFormatError as exc:  # truncated/unreadable: the rest of this shard is skipped
                    yield shard, None, exc
                    break
                counter += 1
                if every is not None and (counter - 1) % every != slot:
                    continue
                item = (shard, key, members)
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                pick = rng.randrange(len(buffer))
                buffer[pick], item = item, buffer[pick]
                yield item
        rng.shuffle(buffer)
        yield from buffer

    def _bucket(self, sample: StreamSample) -> int:
        aspect = math.log(sample.width / sample.height)
        buckets = self.options.buckets
        return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - aspect))

    def _usable(self, sample: StreamSample) -> str | None:
        opts = self.options
        if not 1 <= len(sample.persons) <= MAX_PERSONS:
            return "face_count"
        if opts.min_quality is not None and sample.quality < opts.min_quality:
            return "quality"
        if min(min(p.box[2] - p.box[0], p.box[3] - p.box[1]) for p in sample.persons) < opts.min_face_size:
            return "small_face"
        return None

    def grouped(self, epoch: int, slot: int, slots: int, pending: dict | None = None,
                counts: dict | None = None) -> Iterator[list[StreamSample]]:
        """Lists of ``batch_size`` samples of one bucket and person count, in stream order.

        ``pending`` (kept by the caller across epochs) holds the incomplete groups, so a slot
        whose share has one sample of a group per epoch still fills its batches.
        """
        pending = {} if pending is None else pending
        counts = {} if counts is None else counts
        for shard, key, members in self.raw_samples(epoch, slot, slots):
            if key is None:  # the shard could not be read on
                logger.warning("skipping the rest of shard %s: %s", shard, members)
                counts.setdefault("bad", []).append((shard, members.reason, str(members)))
                continue
            counts["read"] = counts.get("read", 0) + 1
            try:
                sample = parse_sample(shard, key, members, self.options.max_image_pixels)
            except UnsafePickleError:
                raise
            except ShardFormatError as exc:
                logger.warning("skipping a bad sample (%s): %s", exc.reason, exc)
                counts.setdefault("bad", []).append((f"{shard}:{key}", exc.reason, str(exc)))
                continue
            if self._usable(sample) is not None:
                continue
            if counts is not None:
                counts["usable"] = counts.get("usable", 0) + 1
            group = (self._bucket(sample), len(sample.persons))
            pending.setdefault(group, []).append(sample)
            if len(pending[group]) == self.batch_size:
                yield pending.pop(group)

    def __iter__(self) -> Iterator[dict]:
        slot, slots, workers = self._slot()
        # a resumed DataLoader starts its round-robin at worker 0 while the next batch is number
        # skip_batches: physical worker w carries on the stream of logical worker (w + skip) % W
        worker = (slot - self.rank * workers + self.skip_batches) % workers
        slot = self.rank * workers + worker
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers)
        epoch, produced, pending = 0, 0, {}
        counts: dict = {}  # bad samples and samples read are carried to the next batch, across epochs too
        while True:
            counts["usable"] = 0
            for group in self.grouped(epoch, slot, slots, pending, counts):
                bad, read = counts.pop("bad", []), counts.pop("read", 0)
                if produced < to_skip:  # consumed before the resume: its skips were counted then
                    produced += 1
                    continue
                produced += 1
                batch = collate([self.safe_item(sample, epoch) for sample in group])
                batch["bad"] = bad + batch["bad"]
                batch["read"] = read
                yield batch
            if not counts.get("usable"):
                bad = counts.get("bad", [])
                reasons = ", ".join(f"{r} {n}" for r, n in sorted(_count_reasons(bad).items()))
                raise RuntimeError(f"slot {slot} of {slots} (rank x DataLoader worker) got no usable sample from "
                                   f"{len(self.shards)} shard(s) in epoch {epoch}"
                                   + (f" ({len(bad)} bad: {reasons}; first: {bad[0][2]})" if bad else "")
                                   + ": give more shards/samples, fewer data.num_workers, or lower the phase's "
                                   "min_face_size / min_quality")
            epoch += 1

    # ---- items
    def _reference(self, person: StreamPerson, rng: random.Random):
        """(embedding, image, box) of a reference photo by the authors' rule, or (None, reason)."""
        opts = self.options
        files = self.refs.files(person.name) if self.refs and person.name else []
        if not files:
            return None, "paired_no_reference_photo"
        best, best_score = None, -2.0
        for path in rng.sample(files, min(opts.paired_candidates, len(files))):
            try:
                embedding, box = self.refs.read(path)
            except UnsafePickleError:
                raise
            except (ShardFormatError, OSError, ValueError):
                continue
            if box is None or min(box[2] - box[0], box[3] - box[1]) < opts.min_face_size:
                continue
            if np.array_equal(embedding, person.embedding):  # the training face itself (prepare lists every photo)
                continue
            score = cosine(embedding, person.embedding)
            if score > best_score:
                best, best_score = (path, embedding, box), score
            if score > opts.paired_accept_similarity:
                break
        if best is None or best_score < opts.paired_min_similarity:
            return None, "paired_no_similar_reference"
        path, embedding, box = best
        image = None
        if opts.siglip_crops:
            try:
                image = self.refs.image(path, opts.max_image_pixels)
            except (OSError, ValueError) as exc:
                logger.warning("paired reference %s unreadable (%s)", path, exc)
                return None, "paired_reference_unreadable"
            problem = box_problem(box, image.shape[1], image.shape[0])
            if problem is not None:
                logger.warning("paired reference %s: %s", path, problem[1])
                return None, "paired_reference_unreadable"
        return (embedding, image, box), None

    def safe_item(self, sample: StreamSample, epoch: int) -> dict:
        """:meth:`item`, with any failure turned into a skipped item naming shard and member (and logged)."""
        try:
            return self.item(sample, epoch)
        except UnsafePickleError:
            raise
        except ShardFormatError as exc:
            logger.warning("skipping a bad sample (%s): %s", exc.reason, exc)
            return {"skipped": sample.where, "skip_reason": exc.reason, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one sample must never stop the run; named and counted instead
            message = f"{sample.where}: {type(exc).__name__}: {exc}"
            logger.warning("skipping a sample that failed to load (item_error): %s", message)
            return {"skipped": sample.where, "skip_reason": "item_error", "error": message}

    def item(self, sample: StreamSample, epoch: int) -> dict:
        from withanyone_core.faces import ImageReadError, ImageTooLargeError, decode_image

        opts = self.options
        rng = random.Random(f"{self.seed}:{epoch}:{sample.where}")
        try:
            image = decode_image(sample.image, f"{sample.where}.jpg", opts.max_image_pixels)
        except ImageReadError as exc:
            reason = "image_too_large" if isinstance(exc, ImageTooLargeError) else "image_unreadable"
            logger.warning("skipping unreadable image %s (%s)", sample.where, exc)
            return {"skipped": sample.where, "skip_reason": reason, "error": str(exc)}
        if image.shape[1] != sample.width or image.shape[0] != sample.height:
            raise ShardFormatError(f"{sample.where}.jpg: decoded {image.shape[1]}x{image.shape[0]}, but its header "
                                   f"says {sample.width}x{sample.height}", "image_unreadable")
        width, height = opts.buckets[self._bucket(sample)]
        photo_boxes = np.array([p.box for p in sample.persons], dtype=np.float64)
        pixels, scale, x0, y0 = crop_to_bucket(image, width, height, photo_boxes, opts.crop, rng)
        boxes = torch.tensor(photo_boxes, dtype=torch.float32) * scale - torch.tensor([x0, y0, x0, y0])
        rows = self.landmarks.get((sample.shard, sample.key)) or [None] * len(sample.persons)
        if len(rows) != len(sample.persons):  # a stale cache from other shards of the same name
            logger.warning("%s: %d cached landmark rows for %d faces; its faces leave the GT-aligned ID loss",
                           sample.where, len(rows), len(sample.persons))
            rows = [None] * len(sample.persons)
        has_landmarks = torch.tensor([r is not None for r in rows])
        landmarks = torch.tensor([r if r is not None else [[0.0, 0.0]] * 5 for r in rows], dtype=torch.float32)
        landmarks = landmarks * scale - torch.tensor([x0, y0])
        events: list[str] = []
        ref_embeddings, crops, paired = [], [], []
        for person in sample.persons:
            ref = (person.embedding, image, person.box)
            is_paired = False
            # without a ref/ folder the reference is the training photo itself (the authors' self-reference)
            if self.refs is not None and rng.random() < opts.paired_ratio:
                found, reason = self._reference(person, rng)
                if found is not None:
                    ref, is_paired = found, True
                else:
                    events.append(reason)
                    if opts.paired_fallback == "skip":
                        return {"dropped": sample.where, "reason": reason, "events": events}
            events.append("paired" if is_paired else "unpaired")
            paired.append(is_paired)
            ref_embeddings.append(torch.from_numpy(np.asarray(ref[0], dtype=np.float32)))
            if opts.siglip_crops:
                crops.append(square_crop(ref[1], ref[2]))
        n = len(sample.persons)
        caption = training_caption(opts, rng, sample.caption, n)
        id_valid = faces_inside(boxes, landmarks, width, height) & has_landmarks
        if not bool(has_landmarks.all()):
            events.append("no_gt_landmarks")
        item = {
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0,
            "caption": caption, "num_persons": n, "boxes": boxes, "landmarks": landmarks, "id_valid": id_valid,
            "gt_embeddings": torch.from_numpy(np.stack([p.embedding for p in sample.persons]).astype(np.float32)),
            "ref_embeddings": torch.stack(ref_embeddings),
            "identity_ids": torch.tensor([self.numbers.of(p.name, sample, i) for i, p in enumerate(sample.persons)]),
            "paired": torch.tensor(paired), "record_index": -1, "key": sample.where, "events": events,
        }
        if opts.siglip_crops:
            item["ref_siglip_crops"] = torch.from_numpy(np.stack(crops))
        return item
