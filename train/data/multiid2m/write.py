"""Writing the released MultiID-2M layout (``prepare.py --format multiid2m``, the smoke data).

The reading side, its field rules and the restricted unpickler live in
:mod:`train.data.multiid2m`; everything written here reads back through it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .format import save_pickled_npy
from .landmarks import landmark_file

logger = logging.getLogger("withanyone.prepare")


def write_shard(path: str | Path, samples: Sequence[tuple[str, bytes, dict, dict]]) -> None:
    """Write ``(key, jpg bytes, json dict, npy dict)`` samples as a released-layout tar (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, meta, arrays in samples:
            for suffix, data in (
                ("jpg", jpg),
                ("json", json.dumps(meta).encode("utf-8")),
                ("npy", save_pickled_npy(arrays)),
            ):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------ resumable units of work
# Each unit (a shard; a chunk of identities' references) writes its files atomically, then a
# marker in the progress folder holding the fingerprint of its inputs. A rerun skips every unit
# whose marker matches and whose files are there, so a killed run (or a lost Ray task) redoes
# only the unfinished units; changed inputs change the fingerprint and the unit is rewritten.
PROGRESS_VERSION = 1


def _fingerprint(root: Path, records: Sequence, extra) -> str:
    digest = hashlib.sha1(json.dumps([PROGRESS_VERSION, extra]).encode("utf-8"))
    for record in records:
        stat = (Path(root) / record.image).stat()  # a replaced photo re-encodes
        persons = [[p.identity, list(p.box), [list(xy) for xy in p.landmarks]] for p in record.persons]
        digest.update(
            json.dumps(
                [
                    record.image,
                    record.caption,
                    record.width,
                    record.height,
                    record.quality,
                    persons,
                    stat.st_size,
                    stat.st_mtime_ns,
                ]
            ).encode("utf-8")
        )
        for person in record.persons:
            digest.update(np.ascontiguousarray(person.embedding, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or torn by a kill (markers are renamed into place, so rare)
        return None


def _write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _serial_map(function, argument_tuples: list[tuple]) -> list:
    return [function(*args) for args in argument_tuples]


def write_manifest_shards(
    manifest,
    out_dir: str | os.PathLike,
    per_shard: int = 1000,
    landmark_dir: str | os.PathLike | None = None,
    progress_dir: str | os.PathLike | None = None,
    shard_map=None,
) -> list[Path]:
    """The records of a manifest as released-layout shards ``re_000000.tar``, ...

    Each photo becomes ``<key>.jpg`` (JPEG), ``<key>.json`` (``caption_en``, ``name``,
    ``aesthetics_score`` = the record's quality, the photo's ``width``/``height``) and
    ``<key>.npy`` (the authors' pickled dict of ``bboxes`` and ``embeddings``). The
    manifest's landmarks go to the landmark cache (``landmark_dir``, default ``out_dir``)
    so no detection is needed when training on them.

    ``progress_dir``: resume per shard (see above); None writes every shard.
    ``shard_map(function, argument_tuples)`` -> results in order (e.g. one Ray task per
    shard); default: one shard after another, here. Shards of an earlier run beyond the
    current count are removed (they would be trained on twice otherwise).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    landmark_dir = Path(landmark_dir) if landmark_dir is not None else out_dir
    progress = Path(progress_dir) if progress_dir is not None else None
    count = (len(manifest.records) + per_shard - 1) // per_shard
    paths = [out_dir / f"re_{i:06d}.tar" for i in range(count)]
    todo = []
    for index, path in enumerate(paths):
        records = manifest.records[index * per_shard : (index + 1) * per_shard]
        fingerprint = None
        if progress is not None:
            fingerprint = _fingerprint(manifest.root, records, ["shard", index * per_shard])
            marker = _read_marker(progress / f"{path.name}.json")
            if (
                marker
                and marker.get("fingerprint") == fingerprint
                and path.is_file()
                and path.stat().st_size == marker.get("size")
                and landmark_file(landmark_dir, str(path)).is_file()
            ):
                continue
        todo.append((manifest.root, records, index * per_shard, path, landmark_dir, progress, fingerprint))
    if len(todo) < count:
        logger.info(
            "shards: %d of %d already written by an earlier run and unchanged; writing %d",
            count - len(todo),
            count,
            len(todo),
        )
    (shard_map or _serial_map)(write_records_shard, todo)
    _remove_stale_shards(out_dir, count, landmark_dir, progress)
    return paths


def _remove_stale_shards(out_dir: Path, count: int, landmark_dir: Path, progress: Path | None) -> None:
    for path in sorted(out_dir.glob("re_*.tar")):
        number = path.stem[3:]
        if number.isdigit() and int(number) >= count:
            logger.warning("removing %s: an earlier run wrote it, this collection needs %d shard(s)", path, count)
            landmark_file(landmark_dir, str(path)).unlink(missing_ok=True)
            if progress is not None:
                (progress / f"{path.name}.json").unlink(missing_ok=True)
            path.unlink()


def write_records_shard(
    root: Path,
    records: Sequence,
    first: int,
    path: Path,
    landmark_dir: Path,
    progress: Path | None = None,
    fingerprint: str | None = None,
) -> Path:
    """One shard of :func:`write_manifest_shards`: tar, landmark cache, then its marker."""
    from withanyone_core.faces import load_image

    path = Path(path)
    samples, table = [], {}
    for number, record in enumerate(records, first):
        key = f"{number:09d}"
        image = load_image(Path(root) / record.image)
        meta = {
            "caption_en": record.caption,
            "name": [p.identity for p in record.persons],
            "aesthetics_score": record.quality,
            "width": record.width,
            "height": record.height,
            "source": record.image,
        }
        arrays = {
            "bboxes": np.array([p.box for p in record.persons], dtype=np.float32),
            "embeddings": np.stack([p.embedding for p in record.persons]).astype(np.float32),
        }
        samples.append((key, jpeg_bytes(image), meta, arrays))
        table[key] = [[list(map(float, xy)) for xy in p.landmarks] for p in record.persons]
    write_shard(path, samples)
    _write_json_atomic(landmark_file(landmark_dir, str(path)), {"shard": os.path.abspath(path), "landmarks": table})
    if progress is not None:
        _write_json_atomic(
            Path(progress) / f"{path.name}.json", {"fingerprint": fingerprint, "size": path.stat().st_size}
        )
    return path


def _identity_chunks(by_name: dict[str, list], faces_per_chunk: int) -> list[list[str]]:
    """Identities in name order, grouped into chunks of about ``faces_per_chunk`` references."""
    chunks, current, size = [], [], 0
    for name in sorted(by_name):
        current.append(name)
        size += len(by_name[name])
        if size >= faces_per_chunk:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def write_reference_chunk(
    root: Path,
    identities: list[tuple[str, list]],
    refs: Path,
    centres: Path,
    marker: Path | None = None,
    fingerprint: str | None = None,
) -> list[str]:
    """References and cluster centres of some identities (a unit of work), then their marker.

    ``identities``: ``(name, [(number, image, caption, box, embedding), ...])``. An
    identity's folder is emptied first, so a photo that left the identity leaves its folder.
    """
    from withanyone_core.faces import load_image

    for name, faces in identities:
        folder = Path(refs) / name
        if folder.is_dir():
            for old in folder.iterdir():
                if old.is_file():
                    old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for number, image, caption, box, embedding in faces:
            stem = folder / f"{number:09d}"
            (stem.with_suffix(".jpg")).write_bytes(jpeg_bytes(load_image(Path(root) / image)))
            (stem.with_suffix(".json")).write_text(
                json.dumps({"bboxes": [list(box)], "name": [name], "caption_en": caption})
            )
            (stem.with_suffix(".npy")).write_bytes(
                save_pickled_npy(
                    {"bboxes": np.array([box], dtype=np.float32), "embeddings": embedding[None].astype(np.float32)}
                )
            )
        centre = np.mean([f[4] for f in faces], axis=0).astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, centre, allow_pickle=False)
        target = Path(centres) / f"{name}.npy"
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, target)
    if marker is not None:
        _write_json_atomic(Path(marker), {"fingerprint": fingerprint, "identities": [n for n, _ in identities]})
    return [name for name, _ in identities]


def write_references(
    manifest, refs: Path, centres: Path, progress: Path | None, faces_per_chunk: int = 1000, chunk_map=None
) -> int:
    """Every identity's references (``refs/<name>/``) and centre (``centres/<name>.npy``), resumable per chunk."""
    by_name: dict[str, list] = {}
    records_of: dict[str, list] = {}
    for number, record in enumerate(manifest.records):
        for person in record.persons:
            by_name.setdefault(person.identity, []).append(
                (number, record.image, record.caption, tuple(person.box), person.embedding)
            )
            records_of.setdefault(person.identity, []).append(record)
    refs.mkdir(parents=True, exist_ok=True)
    centres.mkdir(parents=True, exist_ok=True)
    chunks = _identity_chunks(by_name, faces_per_chunk)
    todo = []
    for chunk in chunks:
        marker = fingerprint = None
        if progress is not None:
            fingerprint = _fingerprint(manifest.root, [r for name in chunk for r in records_of[name]], ["refs", chunk])
            marker = progress / f"refs-{hashlib.sha1(chunk[0].encode('utf-8')).hexdigest()[:16]}.json"
            done = _read_marker(marker)
            if (
                done
                and done.get("fingerprint") == fingerprint
                and all((centres / f"{name}.npy").is_file() for name in chunk)
            ):
                continue
        todo.append((manifest.root, [(name, by_name[name]) for name in chunk], refs, centres, marker, fingerprint))
    if len(todo) < len(chunks):
        logger.info(
            "references: %d of %d identity chunks already written and unchanged; writing %d",
            len(chunks) - len(todo),
            len(chunks),
            len(todo),
        )
    (chunk_map or _serial_map)(write_reference_chunk, todo)
    for folder in sorted(p for p in refs.iterdir() if p.is_dir() and p.name not in by_name):
        logger.warning("removing %s: an identity of an earlier run that this collection no longer has", folder)
        shutil.rmtree(folder)
    for centre in sorted(p for p in centres.glob("*.npy") if p.stem not in by_name):
        centre.unlink()
    if progress is not None:
        current = {f"refs-{hashlib.sha1(chunk[0].encode('utf-8')).hexdigest()[:16]}.json" for chunk in chunks}
        for stale in progress.glob("refs-*.json"):
            if stale.name not in current:
                stale.unlink()
    return len(by_name)


def write_multiid2m(manifest, out_dir: str | os.PathLike, per_shard: int = 1000, shard_map=None) -> dict:
    """A manifest as the full released layout under ``out_dir``, resumable per shard and identity chunk.

    ``train/re_*.tar`` (every photo, as ``train_rec``), ``landmarks/`` (the GT landmarks'
    cache), ``ref/untar/<name>/<n>.{jpg,json,npy}`` (each photo of an identity as one of its
    references: JSON ``bboxes`` = that face, pickled ``.npy`` = its embedding; the folder the
    authors untar ``ref/tars/`` into), ``ref/cluster_centers/<name>.npy`` (mean raw
    embedding; a plain, pickle-free .npy) and ``progress/`` (the resume markers).
    ``shard_map(function, argument_tuples)`` runs the shards and identity chunks (Ray tasks).
    """
    out_dir = Path(out_dir)
    progress = out_dir / "progress"
    shards = write_manifest_shards(
        manifest,
        out_dir / "train",
        per_shard,
        landmark_dir=out_dir / "landmarks",
        progress_dir=progress,
        shard_map=shard_map,
    )
    refs, centres = out_dir / "ref" / "untar", out_dir / "ref" / "cluster_centers"
    identities = write_references(manifest, refs, centres, progress, faces_per_chunk=per_shard, chunk_map=shard_map)
    return {
        "shards": [str(p) for p in shards],
        "identities": identities,
        "refs": str(refs),
        "cluster_centers": str(centres),
    }
