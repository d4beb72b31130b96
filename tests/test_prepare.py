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
