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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import DataOptions, collate, cosine, training_caption
from .images import crop_to_bucket, faces_inside, square_crop
from .records import EMBEDDING_DIM

if TYPE_CHECKING:
    from .multiid2m_refs import ReferenceTars

logger = logging.getLogger(__name__)

# the authors keep samples with 1..5 faces (negativeloader_full.process_item)
MAX_PERSONS = 5
# the authors build each identity's negative set from at most 200 reference embeddings
MAX_REFS_PER_IDENTITY = 200


class ShardFormatError(ValueError):
    """A shard member that does not follow the MultiID-2M layout; the message names shard and member."""


class UnsafePickleError(ShardFormatError):
    """A pickle that asks for anything but numpy's array globals: refused, nothing was run."""


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
        raise ShardFormatError(f"{where}: no 'embeddings' (or 'embedding') in the .npy")
    emb = np.asarray(value, dtype=np.float32).reshape(-1, EMBEDDING_DIM) if np.size(value) else np.zeros((0, 512))
    return emb.astype(np.float32)


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ShardFormatError(f"{where}: the .jpg is not an image ({exc})") from exc


def parse_sample(shard: str, key: str, members: dict[str, bytes]) -> StreamSample:
    where = f"{shard}:{key}"
    for suffix in ("jpg", "json", "npy"):
        if suffix not in members:
            raise ShardFormatError(f"{where}: no {key}.{suffix} (a sample is .jpg + .json + .npy)")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{where}.json: not valid JSON ({exc})") from exc
    arrays = load_npy(members["npy"], f"{where}.npy")
    if not isinstance(arrays, dict) or "bboxes" not in arrays:
        raise ShardFormatError(f"{where}.npy: expected a dict with 'bboxes' and 'embeddings'")
    boxes = np.asarray(arrays["bboxes"], dtype=np.float64).reshape(-1, 4)
    embeddings = embeddings_of(arrays, f"{where}.npy")
    if len(embeddings) != len(boxes):
        raise ShardFormatError(f"{where}.npy: {len(boxes)} boxes but {len(embeddings)} embeddings")
    width, height = _image_size(members["jpg"], f"{where}.jpg")
    crop = meta.get("crop") or [0, 0, width, height]
    boxes = boxes - np.array([crop[0], crop[1], crop[0], crop[1]], dtype=np.float64)
    names = person_names(meta, len(boxes))
    persons = tuple(StreamPerson(n, tuple(float(v) for v in b), e) for n, b, e in zip(names, boxes, embeddings))
    quality = meta.get("aesthetics_score")
    return StreamSample(shard, key, members["jpg"], int(width), int(height), str(meta.get("caption_en") or ""),
                        float(quality) if isinstance(quality, (int, float)) else 1.0, persons)


# ------------------------------------------------------------------ shards
def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths of one or more globs (``,`` separates globs in one string)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    found = sorted({path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern.strip()))
                    if path.endswith(".tar")})
    if not found:
        raise FileNotFoundError(f"no .tar shard matches {list(patterns)}: point data.multiid2m.shards at the "
                                "MultiID-2M tars (e.g. /data/MultiID-2M/train_rec/re_*.tar)")
    return found


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of consecutive members sharing a key (webdataset's grouping rule)."""
    key, members = None, {}
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
                key, members = member_key, {}
            members[suffix.lower()] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


# ------------------------------------------------------------------ references, landmarks, negatives
def reference_entry(npy: bytes, meta: bytes | None, where: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A reference's (first embedding, first box from its JSON's ``bboxes``, else its .npy's)."""
    arrays = load_npy(npy, where)
    if not isinstance(arrays, dict):
        raise ShardFormatError(f"{where}: expected a dict with 'embeddings'")
    embedding = embeddings_of(arrays, where)[0]
    boxes = None
    if meta is not None:
        boxes = json.loads(meta.decode("utf-8")).get("bboxes")
    if boxes is None:
        boxes = arrays.get("bboxes")
    box = tuple(float(v) for v in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[0]) if boxes is not None \
        and np.size(boxes) else None
    return embedding, box


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

    def image(self, npy: Path) -> np.ndarray:
        """The reference photo beside the .npy (``<stem>.jpg``), RGB uint8."""
        from withanyone_core.faces import load_image

        return load_image(npy.with_suffix(".jpg"))


def read_cluster_centres(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """``<folder>/<name>.npy``, or the members ``[.../]<name>.npy`` of ``ref/cluster_centers.tar``
    (one streaming pass, never untarred) -> the identity's 512-d centre (plain or pickled .npy)."""
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
        out[name] = np.asarray(load_npy(data, where), dtype=np.float32).reshape(-1)[:EMBEDDING_DIM]
    return out


def landmark_file(cache_dir: str | os.PathLike, shard: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(shard).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(shard).stem}-{digest}.landmarks.json"


def detect_landmarks(shards: Sequence[str], cache_dir: str | os.PathLike, detector, iou_min: float = 0.3) -> int:
    """Detect the GT faces' 5 landmarks once per shard and cache them (the release has none).

    Each GT box takes the detection that overlaps it most (IoU >= ``iou_min``); a box with
    none gets ``null`` and its face leaves the GT-aligned ID loss. Returns shards detected now.
    """
    from withanyone_core.faces import load_image

    from ..losses import box_iou

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    done = 0
    for shard in shards:
        target = landmark_file(cache_dir, shard)
        if target.is_file():
            continue
        table: dict[str, list] = {}
        for key, members in iter_tar_samples(shard):
            try:
                sample = parse_sample(shard, key, members)
                from PIL import Image

                image = load_image(np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")))
            except UnsafePickleError:
                raise
            except (ShardFormatError, OSError) as exc:
                logger.warning("landmarks: skipping %s:%s (%s)", shard, key, exc)
                continue
            faces = detector.detect(image)
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
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"shard": os.path.abspath(shard), "landmarks": table}))
        os.replace(tmp, target)
        done += 1
    return done


def load_landmarks(shards: Sequence[str], cache_dir: str | os.PathLike | None) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    if cache_dir is None:
        return out
    for shard in shards:
        path = landmark_file(cache_dir, shard)
        if path.is_file():
            for key, rows in json.loads(path.read_text(encoding="utf-8"))["landmarks"].items():
                out[(shard, key)] = rows
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
            for key, members in iter_tar_samples(shard):
                try:
                    sample = parse_sample(shard, key, members)
                except UnsafePickleError:
                    raise
                except ShardFormatError:
                    continue
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
            for key, members in iter_tar_samples(shard):
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
        for shard, key, members in self.raw_samples(epoch, slot, slots):
            try:
                sample = parse_sample(shard, key, members)
            except UnsafePickleError:
                raise
            except ShardFormatError as exc:
                logger.warning("skipping a malformed sample: %s", exc)
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
        while True:
            counts: dict = {}
            for group in self.grouped(epoch, slot, slots, pending, counts):
                if produced < to_skip:
                    produced += 1
                    continue
                produced += 1
                yield collate([self.item(sample, epoch) for sample in group])
            if not counts.get("usable"):
                raise RuntimeError(f"slot {slot} of {slots} (rank x DataLoader worker) got no usable sample from "
                                   f"{len(self.shards)} shard(s) in epoch {epoch}: give more shards/samples, fewer "
                                   "data.num_workers, or lower the phase's min_face_size / min_quality")
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
                image = self.refs.image(path)
            except (OSError, ValueError):
                return None, "paired_reference_unreadable"
        return (embedding, image, box), None

    def item(self, sample: StreamSample, epoch: int) -> dict:
        from PIL import Image

        opts = self.options
        rng = random.Random(f"{self.seed}:{epoch}:{sample.where}")
        try:
            with Image.open(io.BytesIO(sample.image)) as img:
                image = np.asarray(img.convert("RGB"))
        except OSError as exc:
            logger.warning("skipping unreadable image %s (%s)", sample.where, exc)
            return {"skipped": sample.where}
        width, height = opts.buckets[self._bucket(sample)]
        photo_boxes = np.array([p.box for p in sample.persons], dtype=np.float64)
        pixels, scale, x0, y0 = crop_to_bucket(image, width, height, photo_boxes, opts.crop, rng)
        boxes = torch.tensor(photo_boxes, dtype=torch.float32) * scale - torch.tensor([x0, y0, x0, y0])
        rows = self.landmarks.get((sample.shard, sample.key)) or [None] * len(sample.persons)
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
