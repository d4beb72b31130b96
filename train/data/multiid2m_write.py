"""Writing the released MultiID-2M layout (``prepare.py --format multiid2m``, the smoke data).

The reading side, its field rules and the restricted unpickler live in
:mod:`train.data.multiid2m`; everything written here reads back through it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .multiid2m import landmark_file, save_pickled_npy


def write_shard(path: str | Path, samples: Sequence[tuple[str, bytes, dict, dict]]) -> None:
    """Write ``(key, jpg bytes, json dict, npy dict)`` samples as a released-layout tar (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, meta, arrays in samples:
            for suffix, data in (("jpg", jpg), ("json", json.dumps(meta).encode("utf-8")),
                                 ("npy", save_pickled_npy(arrays))):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_manifest_shards(manifest, out_dir: str | os.PathLike, per_shard: int = 1000,
                          landmark_dir: str | os.PathLike | None = None) -> list[Path]:
    """The records of a manifest as released-layout shards ``re_000000.tar``, ...

    Each photo becomes ``<key>.jpg`` (JPEG), ``<key>.json`` (``caption_en``, ``name``,
    ``aesthetics_score`` = the record's quality, the photo's ``width``/``height``) and
    ``<key>.npy`` (the authors' pickled dict of ``bboxes`` and ``embeddings``). The
    manifest's landmarks go to the landmark cache (``landmark_dir``, default ``out_dir``)
    so no detection is needed when training on them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    landmark_dir = Path(landmark_dir) if landmark_dir is not None else out_dir
    indices = range((len(manifest.records) + per_shard - 1) // per_shard)
    return [out_dir / f"re_{i:06d}.tar" for i in indices
            if write_manifest_shard(manifest, out_dir, i, per_shard, landmark_dir) is not None]


def write_manifest_shard(manifest, out_dir: Path, index: int, per_shard: int, landmark_dir: Path) -> Path:
    """Shard ``index`` of :func:`write_manifest_shards` (a unit of work a Ray task can take)."""
    from withanyone_core.faces import load_image

    first = index * per_shard
    path = Path(out_dir) / f"re_{index:06d}.tar"
    samples, table = [], {}
    for number, record in enumerate(manifest.records[first:first + per_shard], first):
        key = f"{number:09d}"
        image = load_image(manifest.image_path(record))
        meta = {"caption_en": record.caption, "name": [p.identity for p in record.persons],
                "aesthetics_score": record.quality, "width": record.width, "height": record.height,
                "source": record.image}
        arrays = {"bboxes": np.array([p.box for p in record.persons], dtype=np.float32),
                  "embeddings": np.stack([p.embedding for p in record.persons]).astype(np.float32)}
        samples.append((key, jpeg_bytes(image), meta, arrays))
        table[key] = [[list(map(float, xy)) for xy in p.landmarks] for p in record.persons]
    write_shard(path, samples)
    landmark_dir = Path(landmark_dir)
    landmark_dir.mkdir(parents=True, exist_ok=True)
    target = landmark_file(landmark_dir, str(path))
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"shard": os.path.abspath(path), "landmarks": table}))
    os.replace(tmp, target)
    return path


def write_multiid2m(manifest, out_dir: str | os.PathLike, per_shard: int = 1000, shard_map=None) -> dict:
    """A manifest as the full released layout under ``out_dir``.

    ``train/re_*.tar`` (every photo, as ``train_rec``), ``landmarks/`` (the GT landmarks'
    cache), ``ref/<name>/<n>.{jpg,json,npy}`` (each photo of an identity as one of its
    references: JSON ``bboxes`` = that face, pickled ``.npy`` = its embedding) and
    ``ref/cluster_centers/<name>.npy`` (mean raw embedding; a plain, pickle-free .npy).
    """
    from withanyone_core.faces import load_image

    out_dir = Path(out_dir)
    if shard_map is None:
        shards = write_manifest_shards(manifest, out_dir / "train", per_shard, landmark_dir=out_dir / "landmarks")
    else:  # e.g. Ray tasks, one per shard: the same bytes as the loop
        (out_dir / "train").mkdir(parents=True, exist_ok=True)
        count = (len(manifest.records) + per_shard - 1) // per_shard
        shards = shard_map(write_manifest_shard, [(manifest, out_dir / "train", i, per_shard, out_dir / "landmarks")
                                                  for i in range(count)])
    refs, centres = out_dir / "ref", out_dir / "ref" / "cluster_centers"
    centres.mkdir(parents=True, exist_ok=True)
    by_name: dict[str, list] = {}
    for number, record in enumerate(manifest.records):
        for person in record.persons:
            by_name.setdefault(person.identity, []).append((number, record, person))
    for name, faces in sorted(by_name.items()):
        folder = refs / name
        folder.mkdir(parents=True, exist_ok=True)
        for number, record, person in faces:
            stem = folder / f"{number:09d}"
            (stem.with_suffix(".jpg")).write_bytes(jpeg_bytes(load_image(manifest.image_path(record))))
            (stem.with_suffix(".json")).write_text(json.dumps({"bboxes": [list(person.box)], "name": [name],
                                                               "caption_en": record.caption}))
            (stem.with_suffix(".npy")).write_bytes(save_pickled_npy(
                {"bboxes": np.array([person.box], dtype=np.float32),
                 "embeddings": person.embedding[None].astype(np.float32)}))
        centre = np.mean([p.embedding for _, _, p in faces], axis=0).astype(np.float32)
        np.save(centres / f"{name}.npy", centre, allow_pickle=False)
    return {"shards": [str(p) for p in shards], "identities": len(by_name), "refs": str(refs),
            "cluster_centers": str(centres)}
