"""train/prepare.py on a small photo folder: detection, grouping, outputs, resume."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from train import prepare
from train.clustering import ClusterSearch
from train.data import Manifest, NegativePool
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image


def _photo_folder(root):
    # per-person subfolders: the largest face is that person
    for person, ident in (("alice", 1), ("bob", 2)):
        (root / person).mkdir(parents=True)
        for k in range(2):
            img, _, _ = make_face_image([(5 + 6 * k, 6)], identities=[ident], seed=k)
            Image.fromarray(img).save(root / person / f"{k}.png")
            (root / person / f"{k}.txt").write_text(f"{person} at the beach")
    # group photos at the top level: clustered, joining alice/bob when similar enough
    img, _, _ = make_face_image([(4, 5), (13, 7)], identities=[1, 2], seed=5)
    Image.fromarray(img).save(root / "group.png")
    (root / "group.txt").write_text("two friends")
    img, _, _ = make_face_image([(8, 8)], identities=[3], seed=6)
    Image.fromarray(img).save(root / "stranger_a.png")
    img, _, _ = make_face_image([(3, 12)], identities=[3], seed=7)
    Image.fromarray(img).save(root / "stranger_b.png")
    Image.fromarray(np.full((100, 100, 3), 80, np.uint8)).save(root / "empty.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")


def test_prepare_builds_manifest_and_resumes(tmp_path, caplog):
    models = tmp_path / "insightface"
    build_tiny_antelopev2(models)
    photos, out = tmp_path / "photos", tmp_path / "data"
    _photo_folder(photos)
    args = ["--images", str(photos), "--out", str(out), "--antelopev2", str(models), "--providers", "cpu"]
    summary = prepare.main(args)
    assert summary["photos"] == 9 and summary["records"] == 7 and summary["faces"] == 8
    assert {s["image"] for s in summary["skipped"]} == {"empty.png", "broken.jpg"}
    manifest = Manifest.load(out / "manifest.jsonl")
    by_image = {r.image.split("/")[-1]: r for r in manifest.records}
    group = by_image["group.png"]
    assert [p.identity for p in group.persons] == ["alice", "bob"]  # left to right, joined by similarity
    assert group.caption == "two friends"
    strangers = {by_image["stranger_a.png"].persons[0].identity, by_image["stranger_b.png"].persons[0].identity}
    assert len(strangers) == 1 and strangers.pop().startswith("person_")
    identities = json.loads((out / "identities.json").read_text())
    assert set(identities) == {"alice", "bob", "person_0001"}
    assert len(identities["alice"]["occurrences"]) == 3
    assert len(NegativePool.load(out / "negatives.safetensors")) == 8
    # the manifest's image paths resolve from its own folder
    assert (out / group.image).resolve() == (photos / "group.png").resolve()

    # interrupted run: keep two analysed photos plus a torn line, rerun
    partial = out / prepare.PARTIAL
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    (out / "manifest.jsonl").unlink()
    with caplog.at_level(logging.INFO):
        again = prepare.main(args)
    assert "resuming: 2 of 9 photos already analysed" in caplog.text
    assert again == summary
    assert [r.to_json() for r in Manifest.load(out / "manifest.jsonl").records] == [
        r.to_json() for r in manifest.records
    ]

    # a photo removed since the analysis is left out, not resurrected from the partial file
    (photos / "stranger_b.png").unlink()
    with caplog.at_level(logging.WARNING):
        third = prepare.main(args)
    assert "no longer under --images" in caplog.text
    assert third["photos"] == 8 and third["records"] == 6


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_identity_grouping_by_folder_and_clustering():
    """Clustering on hand-made embeddings: folder names win, close faces join, row blocks agree."""
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(size=512) for name in ("a", "b", "c")}

    def face(centre, x):
        return {"box": [x, 0.0, x + 50.0, 50.0], "embedding": _unit(centres[centre] + 0.2 * rng.normal(size=512))}

    entries = {
        "person_0001/0.png": {"faces": [face("a", 0)]},  # a folder whose name looks like a cluster name
        "group_1.png": {"faces": [face("a", 0), face("b", 100), face("c", 200)]},
        "group_2.png": {"faces": [face("b", 0), face("c", 100)]},
        "solo.png": {"faces": [face("c", 0)]},
    }
    labels = prepare.assign_identities(entries, threshold=0.5)
    assert labels[("group_1.png", 0)] == "person_0001"  # joined the named identity
    b, c = labels[("group_1.png", 1)], labels[("group_1.png", 2)]
    assert b != c and "person_0001" not in (b, c)
    assert labels[("group_2.png", 0)] == b and labels[("group_2.png", 1)] == c == labels[("solo.png", 0)]
    assert prepare.assign_identities(entries, threshold=0.5, search=ClusterSearch("exact", block=1)) == labels
    assert prepare.assign_identities(entries, threshold=0.5, search=ClusterSearch("faiss", block=2)) == labels
    # a threshold above every similarity keeps every unnamed face alone
    apart = prepare.assign_identities(entries, threshold=1.01)
    assert len({v for k, v in apart.items() if k[0] != "person_0001/0.png"}) == 6


def test_two_faces_of_one_photo_never_share_an_identity():
    """Cannot-link: look-alikes in one photo stay apart, directly or through a chain of other photos."""
    rng = np.random.default_rng(1)
    twin = rng.normal(size=512)

    def face(x, noise=0.05):
        return {"box": [x, 0.0, x + 50.0, 50.0], "embedding": _unit(twin + noise * rng.normal(size=512))}

    entries = {
        "twins.png": {"faces": [face(0), face(100)]},  # both faces look alike
        "solo_1.png": {"faces": [face(0)]},  # would chain the twins together under plain single linkage
        "solo_2.png": {"faces": [face(0)]},
        "named/0.png": {"faces": [face(0, 0.3)]},
        "named_pair.png": {"faces": [face(0, 0.01), face(100, 0.01)]},  # both close to "named"
    }
    labels = prepare.assign_identities(entries, threshold=0.5)
    for photo, entry in entries.items():
        names = [labels[(photo, i)] for i in range(len(entry["faces"]))]
        assert len(set(names)) == len(names), (photo, names)
    assert "named" in {labels[("named_pair.png", 0)], labels[("named_pair.png", 1)]}
    # the manifest builder accepts the result (it refuses an identity listed twice in one image)
    assert labels[("solo_1.png", 0)] in {labels[("twins.png", 0)], labels[("twins.png", 1)], "named"}


def test_prepare_multiid2m_format_round_trips_through_the_restricted_reader(tmp_path):
    from train.data import DataOptions
    from train.data.multiid2m import (
        IdentityNumbers,
        MultiID2MStream,
        ReferenceFolder,
        iter_tar_samples,
        load_landmarks,
        parse_sample,
        read_cluster_centres,
    )

    models = tmp_path / "insightface"
    build_tiny_antelopev2(models)
    photos, out = tmp_path / "photos", tmp_path / "data"
    _photo_folder(photos)
    summary = prepare.main(
        [
            "--images",
            str(photos),
            "--out",
            str(out),
            "--antelopev2",
            str(models),
            "--providers",
            "cpu",
            "--format",
            "multiid2m",
            "--shard-size",
            "2",
        ]
    )
    manifest = Manifest.load(out / "manifest.jsonl")  # the manifest stays available
    shards = summary["multiid2m"]["shards"]
    assert len(shards) == (len(manifest) + 1) // 2
    samples = [parse_sample(s, key, members) for s in shards for key, members in iter_tar_samples(s)]
    assert len(samples) == len(manifest)
    landmarks = load_landmarks(shards, out / "multiid2m" / "landmarks")
    for sample, record in zip(samples, manifest.records):
        assert sample.caption == record.caption and (sample.width, sample.height) == (record.width, record.height)
        assert [p.name for p in sample.persons] == [p.identity for p in record.persons]
        for got, want in zip(sample.persons, record.persons):
            np.testing.assert_allclose(got.box, want.box, rtol=1e-6)
            np.testing.assert_array_equal(got.embedding, want.embedding)
        np.testing.assert_allclose(landmarks[(sample.shard, sample.key)], [p.landmarks for p in record.persons])
    refs = ReferenceFolder(out / "multiid2m" / "ref" / "untar")
    centres = read_cluster_centres(out / "multiid2m" / "ref" / "cluster_centers")
    names = sorted({p.identity for r in manifest.records for p in r.persons})
    assert sorted(centres) == names and refs.names() == names
    alice = [p for r in manifest.records for p in r.persons if p.identity == "alice"]
    np.testing.assert_allclose(centres["alice"], np.mean([p.embedding for p in alice], axis=0), rtol=1e-5)
    emb, box = refs.read(refs.files("alice")[0])
    assert any(np.array_equal(emb, p.embedding) and np.allclose(box, p.box) for p in alice)
    # the training stream pairs a face with another photo of the same person from ref/
    options = DataOptions(
        buckets=((128, 128),),
        min_face_size=32,
        siglip_crops=False,
        paired_ratio=1.0,
        paired_min_similarity=-1.0,
        paired_fallback="skip",
    )
    stream = MultiID2MStream(shards, options, 1, refs=refs, numbers=IdentityNumbers(names), landmarks=landmarks)
    alice_sample = next(s for s in samples if [p.name for p in s.persons] == ["alice"])
    item = stream.item(alice_sample, 0)
    assert bool(item["paired"][0]) and bool(item["id_valid"][0])
    assert any(torch_equal(item["ref_embeddings"][0], p.embedding) for p in alice)
    assert not torch_equal(item["ref_embeddings"][0], alice_sample.persons[0].embedding)  # another photo


def torch_equal(tensor, array) -> bool:
    return bool((tensor.numpy() == array).all())


def test_ray_path_on_local_2_cpu_ray_writes_the_same_bytes(tmp_path):
    import filecmp
    from pathlib import Path

    pytest = __import__("pytest")
    ray = pytest.importorskip("ray")
    from train import prepare_ray

    models = tmp_path / "insightface"
    build_tiny_antelopev2(models)
    photos = tmp_path / "photos"
    _photo_folder(photos)
    common = [
        "--images",
        str(photos),
        "--antelopev2",
        str(models),
        "--providers",
        "cpu",
        "--format",
        "multiid2m",
        "--shard-size",
        "2",
    ]
    single, parallel = tmp_path / "single", tmp_path / "ray"
    prepare.main(common + ["--out", str(single)])
    prepare_ray.start("local", num_cpus=2)
    try:  # the Ray run also searches with faiss (as Ray tasks): the same identities as exact search here
        prepare.main(common + ["--out", str(parallel), "--ray", "--ray-actors", "2", "--cluster-index", "faiss"])
        # resumable per shard on Ray too: a lost shard is the only one rewritten
        shards = sorted((parallel / "multiid2m" / "train").glob("*.tar"))
        kept = {p.name: p.stat().st_mtime_ns for p in shards[1:]}
        shards[0].unlink()
        prepare.main(common + ["--out", str(parallel), "--ray", "--ray-actors", "2"])
        assert {p.name: p.stat().st_mtime_ns for p in shards[1:]} == kept and shards[0].is_file()
    finally:
        ray.shutdown()
    for name in ("manifest.jsonl", "identities.json", "negatives.safetensors"):
        assert (single / name).read_bytes() == (parallel / name).read_bytes(), name

    def tree(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    assert tree(single / "multiid2m" / "train") == tree(parallel / "multiid2m" / "train")
    for rel in [f"train/{r}" for r in tree(single / "multiid2m" / "train")] + [
        f"ref/{r}" for r in tree(single / "multiid2m" / "ref")
    ]:
        assert filecmp.cmp(single / "multiid2m" / rel, parallel / "multiid2m" / rel, shallow=False), rel

    def strip(root):  # the cache names hold the shard's absolute path: compare by shard name
        tables = [json.loads(p.read_text()) for p in (root / "multiid2m" / "landmarks").glob("*.json")]
        return {Path(t["shard"]).name: t["landmarks"] for t in tables}

    assert strip(single) == strip(parallel)


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_multiid2m_writing_resumes_per_shard_and_identity_chunk(tmp_path, caplog):
    """A run killed after some units redoes only the others; a rerun of a complete run writes nothing;
    a lost or damaged shard is rewritten; a smaller collection removes the shards it no longer has."""
    import os

    from train.data.multiid2m.write import write_multiid2m

    models = tmp_path / "insightface"
    build_tiny_antelopev2(models)
    photos, out = tmp_path / "photos", tmp_path / "data"
    _photo_folder(photos)
    prepare.main(["--images", str(photos), "--out", str(out), "--antelopev2", str(models), "--providers", "cpu"])
    manifest = Manifest.load(out / "manifest.jsonl")
    reference = tmp_path / "reference"
    write_multiid2m(manifest, reference, per_shard=2)
    expected = {k: v for k, v in _tree_bytes(reference).items() if not k.startswith(("progress/", "landmarks/"))}
    shard_count = sum(k.startswith("train/") for k in expected)
    assert shard_count == 4

    class Killed(RuntimeError):
        pass

    def dies_after(units):
        done = []

        def shard_map(function, argument_tuples):  # a run killed after `units` units of work
            for args in argument_tuples:
                if len(done) == units:
                    raise Killed
                done.append(function(*args))
            return done[-len(argument_tuples) :] if argument_tuples else []

        return shard_map

    ref_chunks = len(list((reference / "progress").glob("refs-*.json")))
    assert ref_chunks >= 2
    target = tmp_path / "resumed"
    with pytest.raises(Killed):  # killed while writing the shards
        write_multiid2m(manifest, target, per_shard=2, shard_map=dies_after(2))
    written = {p.name: p.stat().st_mtime_ns for p in (target / "train").glob("*.tar")}
    assert sorted(written) == ["re_000000.tar", "re_000001.tar"]
    calls = []

    def counting(function, argument_tuples):
        calls.append((function.__name__, len(argument_tuples)))
        return [function(*args) for args in argument_tuples]

    with pytest.raises(Killed):  # killed again, after the two missing shards and one identity chunk
        write_multiid2m(manifest, target, per_shard=2, shard_map=dies_after(3))
    assert {p.name: p.stat().st_mtime_ns for p in (target / "train").glob("re_00000[01].tar")} == written
    write_multiid2m(manifest, target, per_shard=2, shard_map=counting)
    assert calls == [("write_records_shard", 0), ("write_reference_chunk", ref_chunks - 1)]
    got = {k: v for k, v in _tree_bytes(target).items() if not k.startswith(("progress/", "landmarks/"))}
    assert got == expected

    # complete: nothing to do
    calls.clear()
    with caplog.at_level(logging.INFO, logger="withanyone.prepare"):
        write_multiid2m(manifest, target, per_shard=2, shard_map=counting)
    assert calls == [("write_records_shard", 0), ("write_reference_chunk", 0)]
    assert "4 of 4 already written" in caplog.text

    # a damaged shard (size differs from its marker) and a lost one are rewritten, nothing else
    damaged, lost = target / "train" / "re_000002.tar", target / "train" / "re_000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:100])
    lost.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (target / "train").glob("re_00000[01].tar")}
    calls.clear()
    write_multiid2m(manifest, target, per_shard=2, shard_map=counting)
    assert calls[0] == ("write_records_shard", 2)
    assert {p.name: p.stat().st_mtime_ns for p in (target / "train").glob("re_00000[01].tar")} == before
    assert {k: v for k, v in _tree_bytes(target).items() if not k.startswith(("progress/", "landmarks/"))} == expected

    # a changed photo changes its shard's fingerprint: that shard is re-encoded
    record = manifest.records[0]
    os.utime(manifest.image_path(record), ns=(1, 1))
    calls.clear()
    write_multiid2m(manifest, target, per_shard=2, shard_map=counting)
    assert calls[0] == ("write_records_shard", 1)

    # fewer shards than before: the extra ones (and their landmark caches) go
    with caplog.at_level(logging.WARNING, logger="withanyone.prepare"):
        summary = write_multiid2m(manifest, target, per_shard=3)
    assert sorted(p.name for p in (target / "train").glob("*.tar")) == [
        "re_000000.tar",
        "re_000001.tar",
        "re_000002.tar",
    ]
    assert "removing" in caplog.text and len(summary["shards"]) == 3
    assert len(list((target / "landmarks").glob("*.json"))) == 3
