"""MultiID-2M shards read safely: the format errors, the restricted unpickler of the ``.npy`` members,
the tar iteration and one sample's parsing and validation (:func:`parse_sample`, :func:`parsed_samples`)."""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..records import EMBEDDING_DIM, box_problem, embedding_problem

logger = logging.getLogger(__name__)


COMPRESSED_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")


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
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
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
                "re-create it with `python train/prepare.py --format multiid2m`"
            )
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
        raise ShardFormatError(
            f"{where}: embeddings of shape {list(emb.shape)}; expected [faces, {EMBEDDING_DIM}] "
            "(raw antelopev2 vectors)",
            "embedding_shape",
        )
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
        raise ShardFormatError(
            f"{where}: bboxes of shape {list(boxes.shape)}; expected [faces, 4] ([x1, y1, x2, y2] each)", "box_shape"
        )
    return boxes.reshape(-1, 4)


def _crop_of(meta: dict, width: int, height: int, where: str) -> tuple[float, float]:
    """The corner of the photo inside the original (``crop`` = [x1, y1, x2, y2]); (0, 0) without one."""
    crop = meta.get("crop")
    if crop is None or (isinstance(crop, list) and not crop):
        return 0.0, 0.0
    if not isinstance(crop, list) or len(crop) != 4 or not all(_is_number(v) for v in crop):
        raise ShardFormatError(
            f"{where}: crop must be [x1, y1, x2, y2] (4 numbers), got {json.dumps(crop)[:80]}", "crop"
        )
    x1, y1, x2, y2 = (float(v) for v in crop)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise ShardFormatError(f"{where}: crop {crop} must be finite, non-negative, with x2 > x1 and y2 > y1", "crop")
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
        raise ShardFormatError(
            f'{where}.json: expected a JSON object ({{"caption_en": ..., "crop": ...}}), got a {type(meta).__name__}',
            "json",
        )
    caption = meta.get("caption_en")
    if caption is not None and not isinstance(caption, str):
        raise ShardFormatError(f"{where}.json: caption_en must be a string, got {json.dumps(caption)[:80]}", "json")
    for field_name in ("name", "names", "keyword"):
        if field_name in meta and not (
            meta[field_name] is None
            or isinstance(meta[field_name], str)
            or (isinstance(meta[field_name], list) and all(isinstance(n, (str, type(None))) for n in meta[field_name]))
        ):
            raise ShardFormatError(
                f"{where}.json: {field_name} must be a string or a list of strings, got "
                f"{json.dumps(meta[field_name])[:80]}",
                "json",
            )
    quality = meta.get("aesthetics_score")
    if quality is not None and not (_is_number(quality) and math.isfinite(quality)):
        raise ShardFormatError(
            f"{where}.json: aesthetics_score must be a finite number, got {json.dumps(quality)[:80]}", "json"
        )
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
    return StreamSample(
        shard,
        key,
        members["jpg"],
        int(width),
        int(height),
        caption or "",
        float(quality) if quality is not None else 1.0,
        persons,
    )


# ------------------------------------------------------------------ shards
def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths of one or more globs (``,`` separates globs in one string)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    matched = {path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern.strip()))}
    found = sorted(path for path in matched if path.endswith(".tar"))
    compressed = sorted(path for path in matched if path.lower().endswith(COMPRESSED_SHARD_SUFFIXES))
    if compressed and found:
        logger.warning(
            "%d compressed shard(s) matching %s are left out (first: %s): only plain .tar shards are "
            "read; gunzip them to .tar to train on them",
            len(compressed),
            list(patterns),
            compressed[0],
        )
    elif compressed:
        first = compressed[0]
        raise FileNotFoundError(
            f"compressed {first[first.lower().rindex('.tar') :]} shards are not supported: gunzip them to .tar "
            f"(e.g. `gunzip -k {first}`; bzip2/xz/zstd: `bunzip2 -k`, `unxz -k`, `unzstd`) and point "
            f"data.multiid2m.shards at the .tar files ({len(compressed)} compressed shard(s) match "
            f"{list(patterns)}). Shards are streamed many times per run; a plain tar is read without decompressing"
        )
    if not found:
        raise FileNotFoundError(
            f"no .tar shard matches {list(patterns)}: point data.multiid2m.shards at the "
            "MultiID-2M tars (e.g. /data/MultiID-2M/train_rec/re_*.tar)"
        )
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
        raise ShardFormatError(
            f"{path}: unreadable tar {after} ({type(exc).__name__}: {exc}){lost}. "
            "The shard is truncated or damaged: copy it again (compare its size or checksum "
            "with the source)",
            "shard_unreadable",
        ) from exc
    if key is not None:
        yield key, members


def parsed_samples(
    shard: str,
    what: str,
    max_pixels: int | None = None,
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
