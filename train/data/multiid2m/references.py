"""MultiID-2M reference photos: an untarred ``ref/untar/<name>/`` folder (:class:`ReferenceFolder`),
or the released ``ref/tars/*.tar`` read in place, never untarred (:class:`ReferenceTars`).

The authors untar ``ref/tars/`` into ``ref/untar/<name>/*.{npy,jpg,json}`` and list the
folders. :class:`ReferenceTars` reads the same members by random access instead: one scan of
each tar's headers (``tarfile`` seeks over the data of an uncompressed tar) gives every
member's data offset and size; that index is cached as JSON (no pickle) in the trainer's
cache folder, one file per tar, valid while the tar's absolute path, size and mtime are
unchanged, so later runs (and the other ranks) start without scanning. A member is then
one ``seek`` + ``read``.

Identity = the directory a ``.npy`` sits in (``[any/leading/folders/]<name>/<stem>.npy``);
the ``.json`` and ``.jpg`` beside it (same tar, same folder) share its stem. When tars hold
the same ``<name>/<stem>`` twice, the later tar (in sorted path order) wins, as when they
are untarred into one folder one after the other. Members at a tar's root name no identity
and are skipped (a warning counts them).

Compressed tars (``.tar.gz`` ...) have no random access: they are refused with what to do.
The object is pickled into DataLoader workers; file handles are opened lazily per process.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..records import box_problem
from .format import ShardFormatError, _boxes_of, embeddings_of, load_npy

logger = logging.getLogger(__name__)


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

    One interface with :class:`ReferenceTars` (the same photos read
    from ``ref/tars/*.tar`` directly): ``names()``, ``files(name)`` (handles, in file-name
    order), ``read(handle)``, ``image(handle)``, ``description`` and ``fingerprint()``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"reference folder {self.root} does not exist (untar ref/tars/ into it, or "
                "set data.multiid2m.refs to the tars: /data/MultiID-2M/ref/tars/*.tar)"
            )
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


INDEX_VERSION = 1
# member suffixes a reference uses; others (e.g. a README in the tar) are not indexed
REFERENCE_SUFFIXES = ("npy", "json", "jpg")
# open tar files kept per process (the release has many ref tars; stay far below ulimit -n)
MAX_OPEN_TARS = 32

_COMPRESSED_NAMES = {
    ".tar.gz": "gzip",
    ".tgz": "gzip",
    ".tar.bz2": "bzip2",
    ".tbz2": "bzip2",
    ".tar.xz": "xz",
    ".txz": "xz",
    ".tar.zst": "zstd",
    ".tar.zstd": "zstd",
}
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


class CompressedTarError(ValueError):
    """A compressed reference tar: no random access into it."""


def _compressed_error(path: str, kind: str) -> CompressedTarError:
    return CompressedTarError(
        f"{path} is a {kind}-compressed tar: references are read by random access, which a compressed tar does "
        f"not allow. Recompress it as a plain .tar (e.g. `gunzip -k {path}` for gzip) or untar it and set "
        "data.multiid2m.refs to the folder"
    )


def check_plain_tar(path: str) -> None:
    """Refuse a compressed tar by its name or its first bytes (a renamed .tar.gz included)."""
    lowered = path.lower()
    for suffix, kind in _COMPRESSED_NAMES.items():
        if lowered.endswith(suffix):
            raise _compressed_error(path, kind)
    with open(path, "rb") as fh:
        head = fh.read(6)
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise _compressed_error(path, kind)


def expand_reference_tars(patterns: str | Sequence[str]) -> list[str]:
    """Sorted ``.tar`` paths of one or more globs (``,`` separates globs in one string), all plain tars."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    found = set()
    for pattern in patterns:
        for path in glob.glob(os.path.expanduser(pattern)):
            if any(path.lower().endswith(s) for s in _COMPRESSED_NAMES):
                check_plain_tar(path)  # raises, naming the file
            if path.endswith(".tar") and os.path.isfile(path):
                found.add(os.path.abspath(path))
    if not found:
        raise FileNotFoundError(
            f"no .tar file matches {list(patterns)}: point data.multiid2m.refs at the released "
            "reference tars (e.g. /data/MultiID-2M/ref/tars/*.tar) or at the folder they untar "
            "into (<name>/*.npy)"
        )
    for path in found:
        check_plain_tar(path)
    return sorted(found)


class RefMember(NamedTuple):
    """A reference inside a tar: the ``.npy``'s (offset, size) and those of the ``.json``/``.jpg`` beside it."""

    tar: str
    member: str  # the .npy's path inside the tar
    npy: tuple[int, int]
    json: tuple[int, int] | None
    jpg: tuple[int, int] | None

    def __str__(self) -> str:
        return f"{self.tar}:{self.member}"


def index_file(cache_dir: str | os.PathLike, tar: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(tar).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / "ref-index" / f"{Path(tar).stem}-{digest}.json"


def scan_tar(path: str) -> list[list]:
    """``[member name, data offset, size]`` of each reference member (``<dir>/<stem>.{npy,json,jpg}``)."""
    members = []
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            # next() seeks over each member's data; tarfile's own member list is cleared as we go
            # (the index below is all we keep), so a tar of millions of members scans in little memory
            while (info := tar.next()) is not None:
                tar.members.clear()
                base = info.name.rsplit("/", 1)[-1]
                if (
                    not info.isfile()
                    or base.startswith(".")
                    or "." not in base
                    or base.rsplit(".", 1)[1] not in REFERENCE_SUFFIXES
                ):
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"{info.name}: member data past the end of the file")
                members.append([info.name, info.offset_data, info.size])
    except tarfile.TarError as exc:
        if not members:
            raise ShardFormatError(
                f"{path}: not a readable plain tar ({exc}); data.multiid2m.refs takes the released "
                "ref/tars/*.tar (uncompressed) or the folder they untar into"
            ) from exc
        # truncated: the references read whole are used, the rest of this tar is skipped (named)
        logger.warning(
            "reference tar %s is truncated or damaged after %s (%s): its %d reference member(s) before "
            "that are used, the rest is skipped; copy the tar again to use all of it",
            path,
            members[-1][0],
            exc,
            len(members),
        )
    return members


class ReferenceTars:
    """The per-identity reference photos of ``ref/tars/*.tar``, read in place (see the module doc).

    The same interface as :class:`~train.data.multiid2m.ReferenceFolder`: ``names()``,
    ``files(name)`` (handles in file-name order), ``read(handle)`` -> (embedding, box),
    ``image(handle)``, ``description`` and ``fingerprint()``. ``scanned`` counts the tars
    whose index was built now instead of read from the cache.
    """

    def __init__(self, tars: Sequence[str], cache_dir: str | os.PathLike | None, spec: str | None = None):
        self.tars = [os.path.abspath(t) for t in tars]
        if not self.tars:
            raise FileNotFoundError("no reference tar given")
        self.spec = spec or ",".join(self.tars)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.scanned = 0
        self._stats: dict[str, tuple[int, int]] = {}
        by_name: dict[str, dict[str, RefMember]] = {}
        rootless = 0
        for tar in self.tars:
            check_plain_tar(tar)
            members, skipped = self._group(tar, self._index(tar))
            rootless += skipped
            for name, stem, ref in members:
                stems = by_name.setdefault(name, {})  # a folder without a .npy is still a name, as untarred
                if ref is not None:
                    stems[stem] = ref
        # the folder's order: sorted(<name>/*.npy), i.e. by file name
        self._files = {
            name: [stems[s] for s in sorted(stems, key=lambda s: s + ".npy")] for name, stems in by_name.items()
        }
        if rootless:
            logger.warning(
                "references: %d member(s) at the root of %s name no identity folder (<name>/<stem>.npy) "
                "and are skipped",
                rootless,
                self.spec,
            )
        self._pid: int | None = None
        self._open: OrderedDict[str, io.BufferedReader] = OrderedDict()

    # ---- the index
    def _index(self, tar: str) -> list[list]:
        stat = os.stat(tar)
        key = {"version": INDEX_VERSION, "tar": tar, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._stats[tar] = (stat.st_size, stat.st_mtime_ns)
        target = index_file(self.cache_dir, tar) if self.cache_dir is not None else None
        if target is not None and target.is_file():
            try:
                cached = json.loads(target.read_text(encoding="utf-8"))
                if {k: cached.get(k) for k in key} == key:
                    return cached["members"]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable cache: scanned again and rewritten
        members = scan_tar(tar)
        self.scanned += 1
        if target is not None:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**key, "members": members}), encoding="utf-8")
                os.replace(tmp, target)
            except OSError as exc:
                logger.warning(
                    "could not cache the index of %s in %s (%s); it is scanned again next run", tar, target, exc
                )
        return members

    @staticmethod
    def _group(tar: str, members: list[list]) -> tuple[list[tuple[str, str, RefMember | None]], int]:
        """(name, stem, reference) per stem (None for a stem without a .npy), and the count of root members."""
        by_key: dict[tuple[str, str], dict[str, tuple]] = {}
        rootless = 0
        for member, offset, size in members:
            folder, _, base = member.rpartition("/")
            name = folder.rsplit("/", 1)[-1]
            if not name or name == ".":
                rootless += 1
                continue
            stem, suffix = base.rsplit(".", 1)
            by_key.setdefault((folder, stem), {})[suffix] = (member, int(offset), int(size))
        out = []
        for (folder, stem), parts in by_key.items():
            npy = parts.get("npy")
            ref = None
            if npy is not None:
                ref = RefMember(tar, npy[0], *(_span(parts, suffix) for suffix in ("npy", "json", "jpg")))
            out.append((folder.rsplit("/", 1)[-1], stem, ref))
        return out, rootless

    # ---- the interface
    @property
    def root(self) -> str:
        return self.spec

    @property
    def description(self) -> str:
        where = f", index cached in {self.cache_dir / 'ref-index'}" if self.cache_dir is not None else ""
        return f"{self.spec} ({len(self.tars)} tar(s), {len(self._files)} identities{where})"

    def fingerprint(self) -> list:
        """What the negative pool's cache name is keyed by: every tar with its size and mtime."""
        return [[tar, *self._stats[tar]] for tar in self.tars]

    def names(self) -> list[str]:
        return sorted(self._files)

    def files(self, name: str) -> list[RefMember]:
        return self._files.get(name, [])

    def _bytes(self, ref: RefMember, span: tuple[int, int], suffix: str) -> bytes:
        offset, size = span
        fh = self._file(ref.tar)
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise ShardFormatError(
                f"{ref.tar}: {ref.member[:-4]}.{suffix} ends early; the tar changed since it was "
                "indexed (restart the run to re-index it)"
            )
        return data

    def read(self, ref: RefMember) -> tuple[np.ndarray, tuple[float, ...] | None]:
        """(first embedding, first box from the JSON's ``bboxes``, else the .npy's)."""
        meta = self._bytes(ref, ref.json, "json") if ref.json is not None else None
        return reference_entry(self._bytes(ref, ref.npy, "npy"), meta, str(ref))

    def image(self, ref: RefMember, max_pixels: int | None = None) -> np.ndarray:
        """The reference photo beside the .npy (``<stem>.jpg``), RGB uint8, decoded as ``load_image`` decodes files."""
        where = f"{ref.tar}:{ref.member[:-4]}.jpg"
        if ref.jpg is None:
            raise FileNotFoundError(f"{where}: not in the tar (a reference is <stem>.npy + .json + .jpg)")
        return decode_image(self._bytes(ref, ref.jpg, "jpg"), where, max_pixels)

    # ---- per-process file handles
    def _file(self, tar: str) -> io.BufferedReader:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share the parent's file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        fh = self._open.get(tar)
        if fh is None:
            fh = open(tar, "rb")  # noqa: SIM115 (kept open for the next reads; closed on eviction)
            self._open[tar] = fh
            if len(self._open) > MAX_OPEN_TARS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(tar)
        return fh

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = OrderedDict(), None
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for fh in self._open.values():
                fh.close()
        self._open = OrderedDict()


def decode_image(data: bytes, where: str, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8, upright: ``withanyone_core.faces.decode_image`` (the one photo reader)."""
    from withanyone_core.faces import decode_image as decode

    return decode(data, where, max_pixels)


def is_reference_folder(spec: str) -> bool:
    return "," not in spec and Path(spec).is_dir()


def open_references(spec: str, cache_dir: str | os.PathLike | None) -> ReferenceFolder | ReferenceTars:
    """``data.multiid2m.refs``: a folder of ``<name>/`` reference folders, or glob(s) of the released tars."""
    if is_reference_folder(spec):
        return ReferenceFolder(spec)
    return ReferenceTars(expand_reference_tars(spec), cache_dir, spec=spec)


def _span(parts: dict, suffix: str) -> tuple[int, int] | None:
    """(offset, size) of one member of a reference inside its tar, or None when the reference has none."""
    return (parts[suffix][1], parts[suffix][2]) if suffix in parts else None
