"""MultiID-2M reader: the authors' pickled .npy through the restricted unpickler, their field rules,
the rank x worker split, deterministic resume, paired references from ref/."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataOptions
from train.data.multiid2m import (
    IdentityNumbers,
    MultiID2MStream,
    ReferenceFolder,
    ShardFormatError,
    UnsafePickleError,
    expand_shards,
    iter_tar_samples,
    load_npy,
    negative_pool_tensors,
    parse_sample,
    person_names,
)
from train.data.multiid2m.write import write_shard

OPTIONS = DataOptions(buckets=((64, 64),), min_face_size=8, siglip_crops=False)


def _jpg(seed: int, size=(96, 80)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _authors_npy(value: dict) -> bytes:
    """Exactly how the authors write their .npy: np.save of a dict (allow_pickle)."""
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)
    return buf.getvalue()


def _embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 20


def build_shards(folder: Path, shards: int = 4, per_shard: int = 6) -> list[str]:
    """Tiny shards in the released layout (tar members written as the authors' files are)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"re_{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"{s:03d}{k:05d}"
                n = 1 + (k % 2)
                boxes = [[10.0 + 40 * i, 12.0, 40.0 + 40 * i, 44.0] for i in range(n)]
                npy = {
                    "bboxes": boxes,
                    ("embeddings" if k % 3 else "embedding"): [_embedding(100 * s + 10 * k + i) for i in range(n)],
                }
                meta = {
                    "caption_en": f"photo {key}",
                    "url": "http://x",
                    "ram_score": 0.5,
                    "aesthetics_score": 5.0,
                    "name": [f"id{(s + k + i) % 5}" for i in range(n)],
                }
                for suffix, data in (
                    ("jpg", _jpg(s * 100 + k)),
                    ("json", json.dumps(meta).encode()),
                    ("npy", _authors_npy(npy)),
                ):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_authors_pickled_npy_reads_and_malicious_pickle_is_refused_without_running(tmp_path):
    value = {"bboxes": [[1.0, 2.0, 3.0, 4.0]], "embeddings": [_embedding(0)], "n": 1, "s": "x", "t": (1, 2)}
    back = load_npy(_authors_npy(value), "a.tar:k.npy")
    assert back["s"] == "x" and back["t"] == (1, 2) and back["n"] == 1
    np.testing.assert_array_equal(back["embeddings"][0], value["embeddings"][0])
    np.testing.assert_array_equal(load_npy(_authors_npy(np.arange(5.0)), "plain"), np.arange(5.0))  # plain .npy

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    payload = b"\x93NUMPY" + header.getvalue()[6:] + pickle.dumps(Evil(), protocol=3)
    with pytest.raises(UnsafePickleError, match=r"evil\.tar:000\.npy.*(posix|os|nt)\.system.*refused"):
        load_npy(payload, "evil.tar:000.npy")
    assert not marker.exists()
    # the same pickle inside a shard stops the stream naming shard and member
    shard = tmp_path / "evil.tar"
    write_shard(shard, [])
    with tarfile.open(shard, "w") as tar:
        for suffix, data in (("jpg", _jpg(0)), ("json", b"{}"), ("npy", payload)):
            info = tarfile.TarInfo(f"000.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = MultiID2MStream([str(shard)], OPTIONS, batch_size=1)
    with pytest.raises(UnsafePickleError, match="evil.tar:000.npy"):
        next(iter(stream))
    assert not marker.exists()


def test_field_rules_crop_shift_embedding_keys_and_names():
    members = {
        "jpg": _jpg(1),
        "json": json.dumps({"caption_en": "hi", "crop": [5, 7, 95, 80], "keyword": "alice bob carl"}).encode(),
        "npy": _authors_npy(
            {"bboxes": [[15, 17, 45, 50], [50, 20, 80, 60]], "embedding": [_embedding(1), _embedding(2)]}
        ),
    }
    sample = parse_sample("s.tar", "k", members)
    assert sample.persons[0].box == (10.0, 10.0, 40.0, 43.0)  # shifted by the crop's corner
    assert [p.name for p in sample.persons] == ["alice", "bob"] and sample.caption == "hi"
    np.testing.assert_array_equal(sample.persons[1].embedding, _embedding(2))
    assert person_names({"name": ["a", "none"]}, 3) == ["a", None, None]
    assert person_names({"names": ["x", "y"]}, 2) == ["x", "y"]
    assert person_names({"name": "none"}, 1) == [None] and person_names({}, 1) == [None]
    bad = dict(members, npy=_authors_npy({"bboxes": [[1, 2, 3, 4]], "embeddings": []}))
    with pytest.raises(ShardFormatError, match="1 boxes but 0 embeddings"):
        parse_sample("s.tar", "k", bad)


def test_split_over_2_ranks_x_2_workers_sees_every_sample_once(tmp_path):
    shards = build_shards(tmp_path / "rec", shards=4)
    assert expand_shards(str(tmp_path / "rec" / "re_*.tar")) == shards
    for shard_count in (4, 2):  # shard-wise split, and sample-wise when there are fewer shards than slots
        seen = []
        for slot in range(4):
            stream = MultiID2MStream(shards[:shard_count], OPTIONS, batch_size=1, rank=slot // 2, world_size=2)
            seen += [key for _, key, _ in stream.raw_samples(0, slot, 4)]
        assert len(seen) == len(set(seen)) == 6 * shard_count
    # the real DataLoader: 2 workers of one rank of 2 take disjoint samples
    stream = MultiID2MStream(shards, OPTIONS, batch_size=1, rank=1, world_size=2, shuffle_buffer=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    keys = []
    for batch in loader:
        keys += batch["keys"]
        if len(keys) == 12:  # this rank's epoch: 2 shards x 6 samples
            break
    assert len(set(keys)) == 12 and {k.split(":")[0] for k in keys} <= set(shards)


def _batches(stream, count, workers):
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, multiprocessing_context="fork" if workers else None
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


def test_resume_mid_stream_is_bit_identical(tmp_path):
    shards = build_shards(tmp_path / "rec", shards=3, per_shard=5)

    def make(skip):
        options = DataOptions(buckets=((64, 64),), min_face_size=8, siglip_crops=False, text_dropout=0.5)
        return MultiID2MStream(shards, options, batch_size=2, seed=3, shuffle_buffer=4, skip_batches=skip)

    full = _batches(make(0), 9, workers=2)  # runs into the second epoch
    resumed = _batches(make(5), 4, workers=2)
    for a, b in zip(full[5:], resumed):
        assert a["keys"] == b["keys"] and a["caption"] == b["caption"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["boxes"], b["boxes"])
    assert [b["num_persons"] for b in full] and all(b["pixels"].shape[0] == 2 for b in full)


def test_paired_reference_from_ref_folder_and_negative_pool(tmp_path):
    shards = build_shards(tmp_path / "rec", shards=1, per_shard=2)
    sample = parse_sample(shards[0], *next(iter_tar_samples(shards[0])))
    person = sample.persons[0]
    refs = tmp_path / "ref" / person.name
    refs.mkdir(parents=True)
    close = person.embedding + np.random.default_rng(0).standard_normal(512).astype(np.float32) * 2
    for name, emb in (("far", _embedding(999)), ("close", close)):
        Image.open(io.BytesIO(_jpg(5, (80, 80)))).save(refs / f"{name}.jpg")
        (refs / f"{name}.json").write_text(json.dumps({"bboxes": [[5, 5, 60, 60]]}))
        (refs / f"{name}.npy").write_bytes(_authors_npy({"embeddings": [emb]}))
    folder = ReferenceFolder(tmp_path / "ref")
    options = DataOptions(
        buckets=((64, 64),), min_face_size=8, siglip_crops=True, paired_ratio=1.0, paired_fallback="self"
    )
    stream = MultiID2MStream(shards, options, batch_size=1, refs=folder, numbers=IdentityNumbers(folder.names()))
    item = stream.item(sample, 0)
    assert bool(item["paired"][0]) and torch.allclose(item["ref_embeddings"][0], torch.from_numpy(close))
    assert item["ref_siglip_crops"].shape[1:] == (512, 512, 3)
    assert item["identity_ids"][0] == 0 and "no_gt_landmarks" in item["events"]  # no landmark cache given
    embs, ids = negative_pool_tensors(folder, {}, IdentityNumbers(folder.names()))
    assert embs.shape == (2, 512) and ids.tolist() == [0, 0]


def test_written_shards_load_the_way_the_authors_load_them(tmp_path):
    """write_shard's members decode with the authors' own calls (json.loads, np.load(allow_pickle).item())."""
    arrays = {"bboxes": np.array([[1, 2, 30, 40]], np.float32), "embeddings": _embedding(3)[None]}
    write_shard(tmp_path / "re_000000.tar", [("k0", _jpg(0), {"caption_en": "c", "name": ["a"]}, arrays)])
    ((key, members),) = list(iter_tar_samples(str(tmp_path / "re_000000.tar")))
    theirs = np.load(io.BytesIO(members["npy"]), allow_pickle=True).item()
    np.testing.assert_array_equal(theirs["embeddings"], arrays["embeddings"])
    assert key == "k0" and json.loads(members["json"])["caption_en"] == "c"
    assert Image.open(io.BytesIO(members["jpg"])).format == "JPEG"
