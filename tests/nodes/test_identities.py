"""Saved identities: the file format (withanyone_core.identity_store) and the Save / Load WithAnyone Identity
nodes inside the real ComfyUI modules (in-process), with real insightface on the tiny antelopev2 stand-ins and
a tiny SigLIP. Identities are compared bit for bit with freshly encoded ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from support.comfy_env import ROOT, tiny_face_models
from withanyone_core import identity_store as store


# --------------------------------------------------------------------------- the file format
def _identity(name="alice", photos=2, seed=0) -> store.SavedIdentity:
    gen = torch.Generator().manual_seed(seed)
    per_photo = torch.randn(photos, 512, generator=gen)
    per_photo = per_photo / per_photo.norm(dim=1, keepdim=True) * 25  # a real ArcFace embedding's norm: 15-35
    return store.SavedIdentity(
        name=name,
        arcface=per_photo.mean(0),
        siglip=torch.randn(256, 768, generator=gen),
        photo_embeddings=per_photo,
        photos=tuple(
            store.SavedPhoto(k, (10.0 + k, 20.0, 110.5, 140.0), 0.8, k == 1, f"{k:064x}") for k in range(photos)
        ),
        skipped=(photos,),
    )


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    saved = _identity()
    path = store.save_identity(tmp_path / "alice.safetensors", saved)
    loaded = store.load_identity(path)
    assert loaded.same_identity(saved) and loaded == loaded
    assert loaded.photos == saved.photos and loaded.skipped == saved.skipped and loaded.name == "alice"
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert loaded.pack_version == version == store.pack_version() and loaded.format_version == 1
    raw = load_file(str(path))  # plain safetensors: any reader gets the tensors
    assert set(raw) == {"arcface", "siglip", "photo_embeddings"} and raw["siglip"].dtype == torch.float32
    assert not list(tmp_path.glob("*.tmp"))


def test_file_names_from_person_names():
    assert store.file_name("Alice Smith") == "Alice Smith.safetensors"
    assert store.file_name("../bob.safetensors") == "_bob.safetensors"  # no way out of the folder
    assert store.file_name("zoë/2") == "zoë_2.safetensors"
    with pytest.raises(store.IdentityFileError, match="gives no file name"):
        store.file_name(" .. ")


def test_names_are_unicode_normalised_and_length_checked():
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")
    assert nfc != nfd and store.file_name(nfd) == store.file_name(nfc) == f"{nfc}.safetensors"
    assert store.normalize_name(f"  {nfd} ") == nfc
    with pytest.raises(store.IdentityFileError, match="is 300 characters long: use at most 100"):
        store.file_name("a" * 300)
    assert store.file_name("a" * 100) == "a" * 100 + ".safetensors"
    # 100 characters, but 400 bytes as a file name: refused before the file system does it
    with pytest.raises(store.IdentityFileError, match="takes 400 bytes as a file name.*use a shorter name"):
        store.file_name("\U00020000" * 100)  # a CJK letter (\w) of 4 bytes in UTF-8


def _scaled_file(tmp_path, name: str, **factors):
    """A saved identity whose tensors are scaled and whose checksum matches them (as a tool writing its own
    files would make it): only the value check can refuse it."""
    path = store.save_identity(tmp_path / f"{name}.safetensors", _identity(name))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors = {k: v * factors.get(k, 1.0) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**metadata, "content_sha256": store._content_sha256(tensors)})
    return path


def test_values_no_encoder_gives_are_refused(tmp_path):
    cases = {
        "arcface x1e30": ({"arcface": 1e30, "photo_embeddings": 1e30}, r"arcface has norm [\d.]+e\+31, outside 1-100"),
        "arcface zero": ({"arcface": 0.0}, "arcface has norm 0, outside 1-100"),
        "one photo x1e3": ({"photo_embeddings": 1e3}, r"photo_embeddings \(row 1\) has norm 2.5e\+04"),
        "siglip x1e30": ({"siglip": 1e30}, r"siglip holds a value of magnitude .*e\+30, above 10000"),
        "siglip inf": ({"siglip": float("inf")}, "siglip holds NaN or infinite values"),
    }
    for what, (factors, message) in cases.items():
        path = _scaled_file(tmp_path, what.replace(" ", "_"), **factors)
        with pytest.raises(store.IdentityFileError, match=f"is damaged: {message}.*save the person again"):
            store.load_identity(path)
    huge = _identity("huge")
    huge = store.SavedIdentity("huge", huge.arcface * 1e30, huge.siglip, huge.photo_embeddings * 1e30, huge.photos)
    with pytest.raises(store.IdentityFileError, match="cannot save 'huge': arcface has norm"):
        store.save_identity(tmp_path / "huge.safetensors", huge)
    assert not (tmp_path / "huge.safetensors").exists()
    good = _identity()
    store.check_encoded(good.arcface, good.siglip, "person_1")  # a real-looking person passes
    with pytest.raises(store.IdentityValueError, match=r"person_2: its ArcFace embedding has norm [\d.]+e\+31"):
        store.check_encoded(good.arcface * 1e30, good.siglip, "person_2")
    with pytest.raises(store.IdentityValueError, match="its SigLIP features holds NaN"):
        store.check_encoded(good.arcface, good.siglip * float("nan"), "person_1")


def test_image_hash_is_of_the_pixels():
    pixels = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    assert store.image_sha256(pixels) == store.image_sha256(pixels.copy())
    assert store.image_sha256(pixels) != store.image_sha256(pixels.reshape(6, 4, 3))  # same bytes, other shape
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert store.image_sha256(changed) != store.image_sha256(pixels)


def test_wrong_or_damaged_files_are_refused_with_what_to_do(tmp_path):
    path = store.save_identity(tmp_path / "alice.safetensors", _identity())
    tensors, good = load_file(str(path)), path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()

    def write(name, tensors=tensors, **changes):
        target = tmp_path / name
        save_file(tensors, str(target), metadata={k: v for k, v in {**metadata, **changes}.items() if v is not None})
        return target

    cases = {
        "an adapter": (
            write("adapter.safetensors", {"ipa_arc.0.to_q.weight": torch.zeros(2, 2)}, format=None),
            "is not a saved WithAnyone identity",
        ),
        "newer format": (
            write("new.safetensors", format_version="2", pack_version="9.0.0"),
            "identity format 2 by pack version 9.0.0.*update the pack",
        ),
        "edited tensor": (
            write("edited.safetensors", {**tensors, "arcface": tensors["arcface"] + 1}),
            "do not match their checksum",
        ),
        "missing tensor": (
            write("missing.safetensors", {k: v for k, v in tensors.items() if k != "siglip"}),
            "lacks the tensor.s. siglip",
        ),
        "photo count": (write("count.safetensors", photos=json.dumps([])), r"photo_embeddings has shape \(2, 512\)"),
        "NaN": (write("nan.safetensors", {**tensors, "siglip": tensors["siglip"] * float("nan")}), "NaN"),
    }
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (truncated, "not a readable safetensors file")
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    cases["not safetensors"] = (text, "not a readable safetensors file")
    pickled = tmp_path / "alice.pt"
    torch.save(tensors, pickled)
    cases["a pickle"] = (pickled, "pickles are never read")
    for target, message in cases.values():
        with pytest.raises(store.IdentityFileError, match=message):
            store.load_identity(target)
    with pytest.raises(store.IdentityFileError, match="arcface has shape"):
        store.save_identity(
            tmp_path / "bad.safetensors",
            store.SavedIdentity(
                "x", torch.zeros(3), torch.zeros(2, 2), torch.zeros(1, 512), (store.SavedPhoto(0, (0, 0, 1, 1)),)
            ),
        )


# --------------------------------------------------------------------------- the nodes
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    models, analyzer, siglip = tiny_face_models(tmp_path_factory)
    from withanyone_pack.nodes import faces, identities, loaders

    return faces, identities, loaders, analyzer, siglip, models


def _photos(*specs):
    from withanyone_core.testing.faces import make_face_image

    images = [make_face_image(cells, identities=ids, seed=k)[0] for k, (cells, ids) in enumerate(specs)]
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255)


def _extract(faces, analyzer, photos):
    return faces.WithAnyoneFaceExtract.execute(photos, analyzer, 0, 32).result[0]


def test_saved_then_loaded_people_equal_freshly_encoded_ones(pack):
    faces, identities, _, analyzer, siglip, models = pack
    alice = _extract(faces, analyzer, _photos(([(5, 5)], [1]), ([(12, 9)], [1])))
    bob = _extract(faces, analyzer, _photos(([(8, 8)], [2])))
    carol = _extract(faces, analyzer, _photos(([(10, 4)], [3])))
    encode = faces.WithAnyoneIdentityEncode
    fresh = encode.execute(siglip, alice, bob, carol).result[0]

    out = identities.WithAnyoneSaveIdentity.execute(alice, siglip, "Alice")
    assert out.ui["text"] == ["saved Alice.safetensors (2 photos)"]
    assert (models / "withanyone" / "identities" / "Alice.safetensors").is_file()
    identities.WithAnyoneSaveIdentity.execute(carol, siglip, "carol")
    assert set(identities.identity_choices()) == {"Alice.safetensors", "carol.safetensors"}

    loaded_alice, alone = identities.WithAnyoneLoadIdentity.execute("Alice.safetensors").result
    loaded_carol = identities.WithAnyoneLoadIdentity.execute("carol.safetensors").result[0]
    assert loaded_alice.photos == () and loaded_alice.encoded.photos == 2
    # saved people in person order with a fresh one: bit-identical to encoding all three now
    mixed = encode.execute(siglip, loaded_alice, bob, loaded_carol).result[0]
    assert torch.equal(mixed.arcface, fresh.arcface) and torch.equal(mixed.siglip, fresh.siglip)
    assert mixed.photos_per_person == fresh.photos_per_person == (2, 1, 1)
    # only saved people: no SigLIP needed
    saved_only = encode.execute(None, loaded_alice, loaded_carol).result[0]
    assert torch.equal(saved_only.arcface, fresh.arcface[[0, 2]]) and torch.equal(
        saved_only.siglip, fresh.siglip[[0, 2]]
    )
    assert torch.equal(alone.arcface, fresh.arcface[:1]) and torch.equal(alone.siglip, fresh.siglip[:1])
    # the Save node's output is the person encoded: Identity Encode does not encode it again
    passed_on = identities.WithAnyoneSaveIdentity.execute(bob, siglip, "bob").result[0]
    again = encode.execute(None, loaded_alice, passed_on).result[0]
    assert torch.equal(again.arcface, fresh.arcface[:2]) and torch.equal(again.siglip, fresh.siglip[:2])
    with pytest.raises(ValueError, match="person_2 comes from Face Extract.*connect Load WithAnyone SigLIP"):
        encode.execute(None, loaded_alice, bob)
    with pytest.raises(ValueError, match="connect person_1 first"):
        encode.execute(siglip, None, loaded_alice)


def test_saved_metadata_names_the_photos(pack):
    faces, identities, _, analyzer, siglip, models = pack
    photos = _photos(([(5, 5)], [4]), ([], []), ([(11, 6)], [4]))  # the middle photo has no face
    person = faces.WithAnyoneFaceExtract.execute(photos, analyzer, 0, 32, no_face="skip").result[0]
    identities.WithAnyoneSaveIdentity.execute(person, siglip, "dana")
    saved = store.load_identity(models / "withanyone" / "identities" / "dana.safetensors")
    assert [p.image_index for p in saved.photos] == [0, 2] and saved.skipped == (1,)
    for record, photo, index in zip(saved.photos, person.photos, (0, 2)):
        assert record.bbox == photo.bbox and record.score == pytest.approx(photo.score)
        pixels = np.clip(np.rint(photos[index].numpy() * 255), 0, 255).astype(np.uint8)
        assert record.image_sha256 == store.image_sha256(pixels)
    assert torch.equal(saved.photo_embeddings, torch.from_numpy(np.stack([p.embedding for p in person.photos])))


def test_save_refuses_to_replace_another_person_unless_asked(pack):
    faces, identities, loaders, analyzer, siglip, models = pack
    save = identities.WithAnyoneSaveIdentity
    erin = _extract(faces, analyzer, _photos(([(6, 6)], [5])))
    frank = _extract(faces, analyzer, _photos(([(6, 6)], [6])))
    save.execute(erin, siglip, "erin")
    assert save.execute(erin, siglip, "erin").ui["text"] == ["erin.safetensors: already saved (unchanged) (1 photo)"]
    with pytest.raises(FileExistsError, match="holds another identity: choose another name, or set overwrite"):
        save.execute(frank, siglip, "erin")
    assert save.execute(frank, siglip, "erin", overwrite=True).ui["text"] == ["replaced erin.safetensors (1 photo)"]
    fresh = faces.WithAnyoneIdentityEncode.execute(siglip, frank).result[0]
    assert torch.equal(identities.WithAnyoneLoadIdentity.execute("erin.safetensors").result[1].arcface, fresh.arcface)
    loaded = identities.WithAnyoneLoadIdentity.execute("erin.safetensors").result[0]
    with pytest.raises(ValueError, match="loaded from erin.safetensors and is saved already"):
        save.execute(loaded, siglip, "copy")
    # saved people are not adapters: the adapter loader does not offer them
    (models / "withanyone" / "adapter.safetensors").write_bytes(b"")
    assert loaders.adapter_choices() == ["adapter.safetensors"]


def test_save_writes_again_when_its_file_is_gone_and_names_are_one_person(pack):
    faces, identities, _, analyzer, siglip, models = pack
    import unicodedata

    save = identities.WithAnyoneSaveIdentity
    ivan = _extract(faces, analyzer, _photos(([(6, 8)], [8])))
    nfc, nfd = unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")
    assert math.isnan(save.fingerprint_inputs(name=nfc, overwrite=False))  # no file yet: always run
    assert save.execute(ivan, siglip, nfd).ui["text"] == [f"saved {nfc}.safetensors (1 photo)"]
    saved = models / "withanyone" / "identities" / f"{nfc}.safetensors"
    assert store.load_identity(saved).name == nfc
    # the cache key follows the file: written, then deleted by hand -> ComfyUI runs the node again (tested through
    # a real server in test_workflow_runs.py)
    written = save.fingerprint_inputs(name=nfd, overwrite=False)
    assert written == save.fingerprint_inputs(name=nfc, overwrite=False) and isinstance(written, str)
    saved.unlink()  # deleted by hand: the key is one that never equals an earlier one
    assert math.isnan(save.fingerprint_inputs(name=nfc, overwrite=False))
    assert save.execute(ivan, siglip, nfc).ui["text"] == [f"saved {nfc}.safetensors (1 photo)"] and saved.is_file()
    # a file an older pack wrote under the NFD name is the same person: found, not saved twice
    os_nfd = saved.with_name(f"{nfd}.safetensors")
    saved.rename(os_nfd)
    assert save.execute(ivan, siglip, nfc).ui["text"] == [f"{nfd}.safetensors: already saved (unchanged) (1 photo)"]
    assert not saved.exists()
    os_nfd.unlink()
    with pytest.raises(store.IdentityFileError, match="is 300 characters long: use at most 100"):
        save.execute(ivan, siglip, "b" * 300)
    assert math.isnan(save.fingerprint_inputs(overwrite=False))  # a name from another node: always run


def test_absurd_identities_are_refused_before_sampling(pack):
    faces, identities, _, analyzer, siglip, models = pack
    from withanyone_pack.nodes import kontext
    from withanyone_pack.nodes.types import EncodedPerson, Faces

    good = _identity()
    huge = Faces((), (), EncodedPerson(good.arcface * 1e30, good.siglip, 1, "huge"))
    with pytest.raises(store.IdentityValueError, match="person_1: its ArcFace embedding has norm"):
        faces.WithAnyoneIdentityEncode.execute(None, huge)
    with pytest.raises(store.IdentityValueError, match="person_1: its ArcFace embedding has norm"):
        kontext.WithAnyoneArcFaceIdentities.execute(huge)
    noisy = Faces((), (), EncodedPerson(good.arcface, good.siglip * 1e8, 1, "noisy"))
    with pytest.raises(store.IdentityValueError, match="person_2: its SigLIP features holds a value of magnitude"):
        faces.WithAnyoneIdentityEncode.execute(
            None, Faces((), (), EncodedPerson(good.arcface, good.siglip, 1, "ok")), noisy
        )


def test_a_missing_saved_person_says_how_to_save_one(pack):
    _, identities, _, _, _, models = pack
    load = identities.WithAnyoneLoadIdentity
    message = load.validate_inputs("person_1.safetensors")
    assert isinstance(message, str)
    for part in (
        "no saved identity 'person_1.safetensors' in models/withanyone/identities/",
        str(models / "withanyone" / "identities"),
        "Save WithAnyone Identity",
        "WithAnyone - save people",
    ):
        assert part in message
    with pytest.raises(FileNotFoundError, match="save the person first with a Save WithAnyone Identity node"):
        load.execute("person_1.safetensors")
    with pytest.raises(FileNotFoundError, match="no saved identity '../adapter.safetensors'"):
        load.execute("../adapter.safetensors")  # only the listed files, never a path out of the folder


def test_load_reports_a_damaged_file_and_rereads_a_changed_one(pack):
    _, identities, _, _, _, models = pack
    folder = models / "withanyone" / "identities"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(store.IdentityFileError, match="broken.safetensors is not a readable safetensors file"):
        identities.WithAnyoneLoadIdentity.execute("broken.safetensors")
    load = identities.WithAnyoneLoadIdentity
    store.save_identity(folder / "gina.safetensors", _identity("gina", seed=1))
    before = load.fingerprint_inputs("gina.safetensors")
    store.save_identity(folder / "gina.safetensors", _identity("gina", photos=3, seed=2))
    assert load.fingerprint_inputs("gina.safetensors") != before
    out = load.execute("gina.safetensors")
    assert out.result[0].encoded.photos == 3 and out.ui["text"][0].startswith("gina: 3 photos, saved ")


def test_a_saved_person_feeds_the_kontext_arcface_identities(pack):
    faces, identities, _, analyzer, siglip, _ = pack
    from withanyone_pack.nodes import kontext

    hana = _extract(faces, analyzer, _photos(([(7, 5)], [7]), ([(9, 9)], [7])))
    identities.WithAnyoneSaveIdentity.execute(hana, siglip, "hana")
    loaded = identities.WithAnyoneLoadIdentity.execute("hana.safetensors").result[0]
    arcface_only = kontext.WithAnyoneArcFaceIdentities
    fresh = arcface_only.execute(hana).result[0]
    saved = arcface_only.execute(loaded).result[0]
    assert torch.equal(saved.arcface, fresh.arcface) and saved.photos_per_person == (2,)
