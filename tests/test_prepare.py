"""train/prepare.py on a small photo folder: detection, grouping, outputs, resume."""

import json
import logging

import numpy as np
from PIL import Image

from train import prepare
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
    assert [r.to_json() for r in Manifest.load(out / "manifest.jsonl").records] == [r.to_json() for r in manifest.records]

    # a photo removed since the analysis is left out, not resurrected from the partial file
    (photos / "stranger_b.png").unlink()
    with caplog.at_level(logging.WARNING):
        third = prepare.main(args)
    assert "no longer under --images" in caplog.text
    assert third["photos"] == 8 and third["records"] == 6


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_identity_grouping_by_folder_and_clustering(monkeypatch):
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
    monkeypatch.setattr(prepare, "CLUSTER_BLOCK", 1)
    assert prepare.assign_identities(entries, threshold=0.5) == labels
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
