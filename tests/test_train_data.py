"""Training data: manifest validation, paired references, negatives, buckets, skipping, resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (
    BucketBatchSampler,
    DataOptions,
    IdentityIndex,
    Manifest,
    ManifestError,
    NegativePool,
    TextEmbeddingCache,
    WithAnyoneDataset,
    collate,
    fixed_prompt,
)


def _person(identity, x, rng):
    box = [x, 40.0, x + 60.0, 110.0]
    lms = [[x + 20, 60], [x + 40, 60], [x + 30, 75], [x + 22, 90], [x + 38, 90]]
    return {"identity": identity, "box": box, "landmarks": lms, "embedding": rng.normal(size=512).tolist()}


def _write_dataset(root, identities=("ann", "bob", "cid", "dee"), per_identity=3, broken=()):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(per_identity):
        for j, (a, b) in enumerate(zip(identities, identities[1:] + identities[:1])):
            name = f"img_{i}_{j}.png"
            w, h = (256, 192) if (i + j) % 2 else (192, 256)
            if name not in broken:
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
            else:
                (root / name).write_bytes(b"not an image")
            lines.append({"image": name, "caption": f"{a} and {b}", "width": w, "height": h,
                          "quality": 0.5 + 0.1 * (i % 3), "persons": [_person(a, 10, rng), _person(b, 100, rng)]})
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_round_trip(tmp_path):
    path = _write_dataset(tmp_path)
    manifest = Manifest.load(path)
    manifest.save(tmp_path / "copy.jsonl")
    again = Manifest.load(tmp_path / "copy.jsonl")
    assert [r.to_json() for r in again.records] == [r.to_json() for r in manifest.records]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r.update(extra=1), "unknown \\['extra'\\]"),
        (lambda r: r["persons"][0].update(box=[10, 10, 5, 20]), "x2 > x1"),
        (lambda r: r["persons"][0].update(embedding=[0.0] * 10), "512 finite"),
        (lambda r: r.update(persons=[]), "at least one person"),
        (lambda r: r.update(persons="ann"), "persons must be a list"),
        (lambda r: r.update(width="wide"), "positive integers"),
        (lambda r: r.update(height=0), "positive integers"),
        (lambda r: r.update(quality="good"), "quality must be numbers"),
        (lambda r: r.pop("image"), "missing \\['image'\\]"),
        (lambda r: r["persons"][0].update(box=5), "box .* must be 4 finite"),
        (lambda r: r["persons"][0].update(box=[1, 2, "x", 4]), "box .* must be numbers"),
        (lambda r: r["persons"][0].update(landmarks=[[1, 2]] * 4), "landmarks .* must be 5x2"),
        (lambda r: r["persons"][0].update(identity=""), "non-empty string"),
        (lambda r: r["persons"][1].update(identity=r["persons"][0]["identity"]), "identity listed twice"),
        (lambda r: r["persons"][0].pop("embedding"), "missing \\['embedding'\\]"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, mutate, match):
    path = _write_dataset(tmp_path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    mutate(record)
    lines[2] = json.dumps(record)
    path.write_text("\n".join(lines))
    with pytest.raises(ManifestError, match=f"line 3.*{match}"):
        Manifest.load(path)


def test_manifest_error_for_bad_json_and_missing_file(tmp_path):
    path = _write_dataset(tmp_path)
    path.write_text(path.read_text() + '{"image": "x.png", \n')
    with pytest.raises(ManifestError, match="line 13: not valid JSON"):
        Manifest.load(path)
    with pytest.raises(ManifestError, match="prepare.py"):
        Manifest.load(tmp_path / "absent.jsonl")


def test_item_keys_and_types(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    item = WithAnyoneDataset(manifest, DataOptions(buckets=((192, 256),)), seed=0)[0]
    assert set(item) == {"pixels", "caption", "num_persons", "boxes", "landmarks", "gt_embeddings",
                         "ref_embeddings", "ref_siglip_crops", "identity_ids", "paired", "record_index"}
    n = item["num_persons"]
    assert item["pixels"].dtype == torch.float32 and item["pixels"].shape == (3, 256, 192)
    assert item["boxes"].shape == (n, 4) and item["landmarks"].shape == (n, 5, 2)
    assert item["gt_embeddings"].shape == (n, 512) == item["ref_embeddings"].shape
    assert item["identity_ids"].dtype == torch.int64 and item["paired"].dtype == torch.bool
    assert isinstance(item["record_index"], int) and isinstance(item["caption"], str)


def _occurrence_of(manifest, embedding):
    """(record, person) whose stored embedding is exactly ``embedding`` (all are random, so unique)."""
    hits = [(r, p) for r, record in enumerate(manifest.records) for p, person in enumerate(record.persons)
            if np.array_equal(person.embedding, embedding.numpy())]
    assert len(hits) == 1
    return hits[0]


def test_paired_ratio_and_never_same_record(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(paired_ratio=0.5, buckets=((256, 192), (192, 256))), seed=1)
    paired = total = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for pos in range(len(ds)):
            item = ds[pos]
            record = manifest.records[item["record_index"]]
            for k in range(item["num_persons"]):
                ref_record, ref_person = _occurrence_of(manifest, item["ref_embeddings"][k])
                assert manifest.records[ref_record].persons[ref_person].identity == record.persons[k].identity
                if item["paired"][k]:
                    assert ref_record != item["record_index"]  # another photo of the same person
                else:
                    assert (ref_record, ref_person) == (item["record_index"], k)
                paired += int(item["paired"][k])
                total += 1
    assert total == 4 * 12 * 2 and 0.35 < paired / total < 0.65


def test_items_are_deterministic_per_seed_epoch_position(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    options = DataOptions(paired_ratio=0.5, text_dropout=0.3, buckets=((64, 64),))
    a, b = WithAnyoneDataset(manifest, options, seed=7), WithAnyoneDataset(manifest, options, seed=7)
    b.set_epoch(1)
    choices = {}
    for epoch in (1, 0):
        a.set_epoch(epoch)
        choices[epoch] = [(a[p]["paired"].tolist(), a[p]["caption"]) for p in range(6)]
    assert choices[1] == [(b[p]["paired"].tolist(), b[p]["caption"]) for p in range(6)]
    assert choices[0] != choices[1]


def test_unreadable_paired_reference_is_counted(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path, identities=("ann", "bob"), per_identity=1))
    (tmp_path / manifest.records[1].image).unlink()
    ds = WithAnyoneDataset(manifest, DataOptions(paired_ratio=1.0), seed=0)
    item = ds[ds.record_indices.index(0)]
    assert not bool(item["paired"].any())
    assert ds.stats["paired_reference_unreadable"] == 2


def test_single_record_identity_falls_back_and_counts(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path, per_identity=1, identities=("ann", "bob")))
    ds = WithAnyoneDataset(manifest, DataOptions(paired_ratio=1.0), seed=0)
    # ann/bob appear in both records, so paired refs exist; a third identity alone does not
    item = ds[0]
    assert bool(item["paired"].all())
    lone = Manifest([manifest.records[0]], manifest.root)
    ds = WithAnyoneDataset(lone, DataOptions(paired_ratio=1.0), seed=0)
    item = ds[0]
    assert not bool(item["paired"].any())
    assert ds.stats["paired_fallback_single_record"] == 2


def test_item_geometry_follows_resize_and_crop(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(buckets=((128, 128),)), seed=0)
    item = ds[0]
    record = manifest.records[ds.record_indices[0]]
    scale = max(128 / record.width, 128 / record.height)
    x0 = (round(record.width * scale) - 128) // 2
    y0 = (round(record.height * scale) - 128) // 2
    expected = torch.tensor(record.persons[0].box) * scale - torch.tensor([x0, y0, x0, y0])
    assert torch.allclose(item["boxes"][0], expected.float(), atol=1e-4)
    assert item["pixels"].shape == (3, 128, 128) and 0 <= item["pixels"].min() and item["pixels"].max() <= 1
    assert item["ref_siglip_crops"].shape == (2, 512, 512, 3) and item["ref_siglip_crops"].dtype == torch.uint8


def test_negatives_exclude_batch_identities():
    pool = NegativePool(torch.randn(40, 512), torch.arange(40) % 8)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        exclude = torch.randint(0, 8, (3,), generator=g)
        negs = pool.sample(16, exclude, g)
        rows = [(pool.embeddings == n).all(dim=1).nonzero().item() for n in negs]
        assert not torch.isin(pool.identity_ids[rows], exclude).any()
    with pytest.raises(ValueError, match="no identity outside"):
        pool.sample(4, torch.arange(8), g)


def test_negative_pool_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a negative pool"):
        NegativePool.load(tmp_path / "other.safetensors")


def test_negative_pool_round_trip(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    pool = NegativePool.from_manifest(manifest, IdentityIndex(manifest))
    pool.save(tmp_path / "neg.safetensors")
    again = NegativePool.load(tmp_path / "neg.safetensors")
    assert torch.equal(again.embeddings, pool.embeddings) and len(again) == 24


def test_buckets_group_sizes_and_person_counts(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(buckets=((256, 192), (192, 256))), seed=0)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    it = iter(sampler)
    for _ in range(6):
        batch = collate([ds[p] for p in next(it)])
        assert batch["pixels"].shape[0] == 2 and batch["boxes"].shape == (2, 2, 4)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path, broken=("img_0_0.png",)))
    (tmp_path / "img_0_1.png").unlink()
    ds = WithAnyoneDataset(manifest, DataOptions(), seed=0)
    batch = collate([ds[p] for p in range(len(ds))])
    assert sorted(p.split("/")[-1] for p in batch["skipped"]) == ["img_0_0.png", "img_0_1.png"]
    assert batch["size"] == len(ds) - 2


def test_sampler_resume_is_exact(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(), seed=3)
    full = BucketBatchSampler(ds, batch_size=2, seed=3)
    it = iter(full)
    reference = [next(it) for _ in range(15)]
    first = BucketBatchSampler(ds, batch_size=2, seed=3)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    resumed = BucketBatchSampler(ds, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it) for _ in range(8)] == reference[7:]  # crosses two epoch ends (6 batches each)
    assert resumed.state_dict() == {"epoch": 2, "position": 3}
    # every record once per epoch, and a new order each epoch
    epoch0, epoch1 = reference[:6], reference[6:12]
    assert sorted(p for b in epoch0 for p in b) == list(range(len(ds)))
    assert sorted(p for b in epoch1 for p in b) == list(range(len(ds)))
    assert epoch0 != epoch1


def test_ranks_take_disjoint_batches(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(), seed=0)
    r0 = BucketBatchSampler(ds, 2, seed=0, num_replicas=2, rank=0)._batches(0)
    r1 = BucketBatchSampler(ds, 2, seed=0, num_replicas=2, rank=1)._batches(0)
    assert len(r0) == len(r1) and not set(map(tuple, r0)) & set(map(tuple, r1))


def test_quality_subset_and_prompts(tmp_path):
    manifest = Manifest.load(_write_dataset(tmp_path))
    ds = WithAnyoneDataset(manifest, DataOptions(min_quality=0.65, prompt_mode="fixed"), seed=0)
    assert all(manifest.records[i].quality >= 0.65 for i in ds.record_indices)
    assert ds[0]["caption"] == "two people"
    assert fixed_prompt("a photo of {n} people", 3) == "a photo of three people"
    with pytest.raises(ValueError, match="min_quality"):
        WithAnyoneDataset(manifest, DataOptions(min_quality=5.0))
    dropped = WithAnyoneDataset(manifest, DataOptions(text_dropout=1.0), seed=0)
    assert dropped[0]["caption"] == ""


def test_text_embedding_cache(tmp_path):
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert cache.get("two people") is None
    cache.put("two people", {"t5": torch.ones(3, 4)})
    assert torch.equal(cache.get("two people")["t5"], torch.ones(3, 4))
