"""MultiID-2M references read from the released ref/tars/*.tar and ref/cluster_centers.tar in place:
the same answers as the untarred folders, the cached member index, DataLoader workers, refusals."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_multiid2m import build_shards

from train.config import ConfigError, check_paths, load_config
from train.data import DataOptions
from train.data.multiid2m import (
    IdentityNumbers,
    MultiID2MStream,
    ReferenceFolder,
    UnsafePickleError,
    iter_tar_samples,
    negative_pool_tensors,
    parse_sample,
    read_cluster_centres,
    save_pickled_npy,
)
from train.data.multiid2m.references import (
    CompressedTarError,
    ReferenceTars,
    expand_reference_tars,
    index_file,
    open_references,
)


def _photo(seed: int, size=(72, 64), mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _references(shards: list[str]) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Per identity of the shards, (stem, {suffix: bytes}) references as the authors write them: some close
    to a training face, some far, one without a .json (its box from the .npy), stems whose order differs
    between "<stem>" and "<stem>.npy" ("a" vs "a-b"), a greyscale photo."""
    faces: dict[str, list[np.ndarray]] = {}
    for shard in shards:
        for key, members in iter_tar_samples(shard):
            for person in parse_sample(shard, key, members).persons:
                faces.setdefault(person.name, []).append(person.embedding)
    rng = np.random.default_rng(7)
    out = {}
    for n, name in enumerate(sorted(faces)):
        refs = []
        for i, stem in enumerate(["a", "a-b", "b_far", f"{name}_00{n}"]):
            close = faces[name][i % len(faces[name])] + rng.standard_normal(512).astype(np.float32) * 3
            emb = close if stem != "b_far" else rng.standard_normal(512).astype(np.float32) * 20
            members = {
                "npy": save_pickled_npy({"embeddings": [emb], "bboxes": [[4.0, 4.0, 50.0 + i, 52.0]]}),
                "jpg": _photo(100 * n + i, mode="L" if i == 1 else "RGB"),
            }
            if stem != "a-b":
                members["json"] = json.dumps({"bboxes": [[6, 5, 58, 60 - i]], "caption_en": "ref"}).encode()
            refs.append((stem, members))
        out[name] = refs
    return out


def _write_both(tmp_path: Path, refs: dict) -> tuple[Path, list[str]]:
    """The references untarred (ref/untar/<name>/) and as two tars (one with leading folders, as released)."""
    folder = tmp_path / "ref" / "untar"
    names = sorted(refs)
    tars = [tmp_path / "ref" / "tars" / f"ref_{i:03d}.tar" for i in range(2)]
    tars[0].parent.mkdir(parents=True)
    with tarfile.open(tars[0], "w") as first, tarfile.open(tars[1], "w") as second:
        for n, name in enumerate(names):
            (folder / name).mkdir(parents=True)
            tar, prefix = (first, f"untar/{name}") if n % 2 == 0 else (second, name)
            for stem, members in refs[name]:
                for suffix, data in members.items():
                    (folder / name / f"{stem}.{suffix}").write_bytes(data)
                    _add(tar, f"{prefix}/{stem}.{suffix}", data)
        # a stale copy of one reference in the first tar is overridden by the second (later) tar
        stem, members = refs[names[1]][0]
        _add(first, f"untar/{names[1]}/{stem}.npy", save_pickled_npy({"embeddings": [np.ones(512, np.float32)]}))
    return folder, [str(t) for t in tars]


@pytest.fixture()
def released(tmp_path):
    shards = build_shards(tmp_path / "rec", shards=2, per_shard=4)
    folder, tars = _write_both(tmp_path, _references(shards))
    return shards, folder, tars, tmp_path / "cache"


def test_tars_read_exactly_what_the_untarred_folder_holds(released):
    shards, folder_path, tars, cache = released
    folder = ReferenceFolder(folder_path)
    packed = open_references(str(Path(tars[0]).parent / "*.tar"), cache)
    assert isinstance(packed, ReferenceTars) and packed.scanned == 2
    assert packed.names() == folder.names() and len(folder.names()) == 5
    for name in folder.names():
        paths, members = folder.files(name), packed.files(name)
        assert [p.name for p in paths] == [Path(m.member).name for m in members]
        assert [p.stem for p in paths][:2] == ["a-b", "a"]  # "a-b.npy" sorts before "a.npy"
        for path, member in zip(paths, members):
            (emb_f, box_f), (emb_t, box_t) = folder.read(path), packed.read(member)
            np.testing.assert_array_equal(emb_f, emb_t)
            assert box_f == box_t and box_f is not None
            assert np.array_equal(folder.image(path), packed.image(member))
            assert packed.image(member).shape == (64, 72, 3)
    assert packed.read(packed.files(folder.names()[0])[0])[1] == (4.0, 4.0, 50.0 + 1, 52.0)  # no json: the .npy's
    assert packed.files("nobody") == [] and "2 tar(s), 5 identities" in packed.description
    embs_f, ids_f = negative_pool_tensors(folder, {}, IdentityNumbers(folder.names()))
    embs_t, ids_t = negative_pool_tensors(packed, {}, IdentityNumbers(packed.names()))
    assert torch.equal(embs_f, embs_t) and torch.equal(ids_f, ids_t) and len(ids_t) == 20


def _items(shards, refs, epochs=3):
    options = DataOptions(
        buckets=((64, 64),),
        min_face_size=8,
        siglip_crops=True,
        paired_ratio=1.0,
        paired_fallback="self",
        paired_candidates=2,
    )
    stream = MultiID2MStream(shards, options, batch_size=1, refs=refs, numbers=IdentityNumbers(refs.names()))
    return [
        stream.item(parse_sample(shard, key, members), epoch)
        for epoch in range(epochs)
        for shard in shards
        for key, members in iter_tar_samples(shard)
    ]


def test_paired_reference_choice_is_the_same_from_tars_and_folder(released):
    shards, folder_path, tars, cache = released
    from_folder = _items(shards, ReferenceFolder(folder_path))
    from_tars = _items(shards, ReferenceTars(tars, cache))
    assert len(from_folder) == len(from_tars) == 24
    for a, b in zip(from_folder, from_tars):
        assert a["events"] == b["events"] and torch.equal(a["paired"], b["paired"])
        assert torch.equal(a["ref_embeddings"], b["ref_embeddings"])
        assert torch.equal(a["ref_siglip_crops"], b["ref_siglip_crops"])
    paired = sum(int(a["paired"].sum()) for a in from_tars)
    assert 0 < paired < sum(len(a["paired"]) for a in from_tars)  # some references pass, the far ones do not
    assert sum(e == "paired_no_similar_reference" for a in from_tars for e in a["events"]) > 0


def test_member_index_is_cached_once_and_rebuilt_when_a_tar_changes(released):
    shards, _, tars, cache = released
    first = ReferenceTars(tars, cache)
    cached = [index_file(cache, t) for t in tars]
    assert first.scanned == 2 and all(p.is_file() for p in cached)
    assert json.loads(cached[0].read_text())["tar"] == os.path.abspath(tars[0])  # plain JSON, no pickle
    written = [p.stat().st_mtime_ns for p in cached]
    again = ReferenceTars(tars, cache)
    assert again.scanned == 0 and [p.stat().st_mtime_ns for p in cached] == written
    assert again.names() == first.names() and again.files("id1") == first.files("id1")

    # a tar rewritten with one more reference: only that tar is scanned again, and the new one is read
    name = Path(first.files(first.names()[1])[0].member).parent.name
    with tarfile.open(tars[1], "a") as tar:
        _add(tar, f"{name}/zz_new.npy", save_pickled_npy({"embeddings": [np.full(512, 2.0, np.float32)]}))
    future = time.time() + 5  # an mtime that differs even on a coarse-grained file system
    os.utime(tars[1], (future, future))
    changed = ReferenceTars(tars, cache)
    assert changed.scanned == 1 and cached[0].stat().st_mtime_ns == written[0]
    assert cached[1].stat().st_mtime_ns != written[1]
    newest = changed.files(name)[-1]
    assert Path(newest.member).name == "zz_new.npy" and changed.read(newest)[0][0] == 2.0
    assert ReferenceTars(tars, None).scanned == 2  # without a cache folder: scanned every time, still read


def test_tar_references_inside_dataloader_workers(released):
    shards, folder_path, tars, cache = released
    refs = ReferenceTars(tars, cache)
    refs.read(refs.files("id0")[0])  # the parent holds open handles before the workers fork
    copy = pickle.loads(pickle.dumps(refs))  # what a spawned worker receives
    assert copy._open == {} and copy.read(copy.files("id2")[1])[1] == refs.read(refs.files("id2")[1])[1]

    # a forked process must not seek the parent's file (a forked fd shares its offset): it opens its own
    import multiprocessing

    member = refs.files("id3")[2]  # in the other tar than id0's, at another offset
    parent_file = refs._file(member.tar)
    parent_file.seek(0)
    offset = os.lseek(parent_file.fileno(), 0, os.SEEK_CUR)
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=lambda: send.send(refs.read(member)[1]))
    process.start()
    box = receive.recv()
    process.join(30)
    assert os.lseek(parent_file.fileno(), 0, os.SEEK_CUR) == offset == 0  # the child's seeks were its own
    assert box == refs.read(member)[1] and box is not None

    def batches(references):
        options = DataOptions(
            buckets=((64, 64),), min_face_size=8, siglip_crops=True, paired_ratio=1.0, paired_fallback="self"
        )
        stream = MultiID2MStream(
            shards,
            options,
            batch_size=1,
            refs=references,
            shuffle_buffer=2,
            numbers=IdentityNumbers(references.names()),
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == 8:
                return out

    from_tars, from_folder = batches(refs), batches(ReferenceFolder(folder_path))
    assert [b["keys"] for b in from_tars] == [b["keys"] for b in from_folder]
    for a, b in zip(from_tars, from_folder):
        assert torch.equal(a["ref_embeddings"], b["ref_embeddings"]) and torch.equal(a["paired"], b["paired"])
        assert torch.equal(a["ref_siglip_crops"], b["ref_siglip_crops"])
    assert any(bool(b["paired"].any()) for b in from_tars)


def _evil_npy(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    return b"\x93NUMPY" + header.getvalue()[6:] + pickle.dumps(Evil(), protocol=3)


def test_malicious_pickle_in_a_reference_or_centre_tar_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "alice/000.npy", _evil_npy(marker))
        _add(tar, "alice/000.jpg", _photo(0))
    refs = ReferenceTars([str(tar_path)], tmp_path / "cache")
    with pytest.raises(UnsafePickleError, match=r"evil\.tar:alice/000\.npy.*system.*refused"):
        refs.read(refs.files("alice")[0])
    with pytest.raises(UnsafePickleError):
        negative_pool_tensors(refs, {}, IdentityNumbers(refs.names()))
    centres = tmp_path / "cluster_centers.tar"
    with tarfile.open(centres, "w") as tar:
        _add(tar, "cluster_centers/alice.npy", _evil_npy(marker))
    with pytest.raises(UnsafePickleError, match=r"cluster_centers\.tar:cluster_centers/alice\.npy"):
        read_cluster_centres(centres)
    assert not marker.exists()


def test_compressed_reference_tars_are_refused_with_what_to_do(released, tmp_path):
    _, _, tars, cache = released
    gz = tmp_path / "gz" / "ref_000.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(Path(tars[0]).read_bytes()))
    with pytest.raises(CompressedTarError, match=r"ref_000\.tar\.gz is a gzip-compressed tar.*plain \.tar.*untar"):
        expand_reference_tars(str(gz.parent / "*"))
    renamed = tmp_path / "gz" / "ref_001.tar"  # compressed but named .tar: found by its first bytes
    renamed.write_bytes(gz.read_bytes())
    with pytest.raises(CompressedTarError, match="ref_001.tar is a gzip-compressed tar"):
        ReferenceTars([str(renamed)], cache)
    with pytest.raises(FileNotFoundError, match="no .tar file matches"):
        expand_reference_tars(str(tmp_path / "none" / "*.tar"))


def test_cluster_centres_tar_reads_as_the_folder(tmp_path):
    folder = tmp_path / "cluster_centers"
    folder.mkdir()
    with tarfile.open(tmp_path / "cluster_centers.tar", "w") as tar:
        for i, name in enumerate(["bob", "alice", "Dr. X"]):
            value = np.random.default_rng(i).standard_normal(512).astype(np.float32)
            data = _plain_or_pickled(value, i)
            (folder / f"{name}.npy").write_bytes(data)
            _add(tar, f"cluster_centers/{name}.npy", data)
        _add(tar, "cluster_centers/._alice.npy", b"mac resource fork")  # skipped as the folder's glob would not
    from_folder, from_tar = read_cluster_centres(folder), read_cluster_centres(tmp_path / "cluster_centers.tar")
    assert list(from_tar) == sorted(from_folder) == ["Dr. X", "alice", "bob"]
    for name in from_folder:
        np.testing.assert_array_equal(from_folder[name], from_tar[name])


def _plain_or_pickled(value: np.ndarray, i: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value if i % 2 else np.array(value, dtype=object), allow_pickle=True)  # both kinds occur
    return buf.getvalue()


def _config(tmp_path: Path, refs: str | None, centres: str | None):
    for folder in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (tmp_path / "tiny" / folder).mkdir(parents=True, exist_ok=True)
    lines = [f"refs: {refs}"] if refs else []
    lines += [f"cluster_centers: {centres}"] if centres else []
    text = (
        textwrap.dedent("""
        output_dir: out
        models: {base: tiny, siglip: tiny}
        data:
          source: multiid2m
          multiid2m:
            shards: rec/re_*.tar
        """)
        + "".join(f"    {line}\n" for line in lines)
        + "phases:\n  - {name: a, steps: 1, prompt_mode: fixed}\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    return load_config(tmp_path / "c.yaml")


def test_config_takes_tar_globs_or_folders_with_clear_errors(released):
    _, folder, tars, _ = released
    root = folder.parent.parent
    centres_tar = root / "ref" / "cluster_centers.tar"
    with tarfile.open(centres_tar, "w") as tar:
        _add(tar, "id0.npy", save_pickled_npy({"embedding": np.zeros(512, np.float32)}))
    check_paths(_config(root, "ref/tars/*.tar", "ref/cluster_centers.tar"))
    check_paths(_config(root, "ref/untar", None))
    check_paths(_config(root, "ref/tars/ref_000.tar, ref/tars/ref_001.tar", None))  # comma-separated
    with pytest.raises(
        ConfigError,
        match=r"data.multiid2m.refs: .*ref/tars holds tar files but no <name>/ folders: "
        r"set it to the tars themselves, .*ref/tars/\*\.tar",
    ):
        check_paths(_config(root, "ref/tars", None))
    with pytest.raises(ConfigError, match=r"data.multiid2m.refs: .*ref/none\*\.tar is not a folder, and no .tar file"):
        check_paths(_config(root, "ref/none*.tar", None))
    (root / "ref" / "gz").mkdir()
    (root / "ref" / "gz" / "r.tar.gz").write_bytes(gzip.compress(b"x" * 1024))
    with pytest.raises(ConfigError, match=r"data.multiid2m.refs: .*r\.tar\.gz is a gzip-compressed tar.*plain \.tar"):
        check_paths(_config(root, "ref/gz/*.tar*", None))
    with pytest.raises(ConfigError, match=r"data.multiid2m.cluster_centers: .*nope\.tar does not exist"):
        check_paths(_config(root, None, "ref/nope.tar"))
    with pytest.raises(ConfigError, match=r"data.multiid2m.cluster_centers: .*a\.json is a file but not a \.tar"):
        check_paths(_config(root, None, "ref/untar/id0/a.json"))


def test_members_outside_an_identity_folder_are_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ref_000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "./alice/1.npy", save_pickled_npy({"embeddings": [np.ones(512, np.float32)]}))
        _add(tar, "2.npy", save_pickled_npy({"embeddings": [np.ones(512, np.float32)]}))  # no <name>/ folder
        _add(tar, "alice/1.txt", b"not a reference member")
    later = tmp_path / "ref_001.tar"
    with tarfile.open(later, "w") as tar:
        _add(tar, "alice/1.jpg", _photo(0))  # a later tar without the .npy does not hide the earlier one
        _add(tar, "bob/1.jpg", _photo(1))  # a folder without any .npy: a name without references, as untarred
    refs = ReferenceTars([str(path), str(later)], tmp_path / "cache")
    assert refs.names() == ["alice", "bob"] and refs.files("bob") == []
    assert [m.member for m in refs.files("alice")] == ["./alice/1.npy"]
    assert "1 member(s) at the root" in caplog.text
