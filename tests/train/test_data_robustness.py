"""One bad sample never kills a run: every reader validates, skips and names what is bad.

Damaged data is made the way it happens: real shards written by the project's own writer
(the smoke set's MultiID-2M shards, train/data/multiid2m/write.py), then a member replaced
(NaN embedding, box outside the photo, a JSON list, ``"crop": "abc"``, a cut JPEG ...), a tar
truncated mid-member; manifests with broken lines. The last test trains on such shards with
DataLoader workers and checks the run finishes with a finite adapter, naming every skipped sample.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import BadDataError, DataOptions, Manifest, SkipLedger, WithAnyoneDataset, collate
from train.data.multiid2m import (
    MultiID2MStream,
    ShardFormatError,
    expand_shards,
    iter_tar_samples,
    load_landmarks,
    load_npy,
    parse_sample,
    read_cluster_centres,
    reference_entry,
    save_pickled_npy,
)
from train.data.multiid2m.write import write_shard

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = DataOptions(buckets=((64, 64),), min_face_size=8, siglip_crops=False, crop="center")


def _jpg(seed: int, size=(96, 80)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _emb(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(512) * 20).astype(np.float32)


def _good(key: str, seed: int = 0, n: int = 1) -> tuple[str, bytes, dict, dict]:
    boxes = [[10.0 + 40 * i, 12.0, 40.0 + 40 * i, 44.0] for i in range(n)]
    return (
        key,
        _jpg(seed),
        {"caption_en": f"photo {key}", "name": [f"id{i}" for i in range(n)]},
        {"bboxes": boxes, "embeddings": [_emb(seed * 10 + i) for i in range(n)]},
    )


def _with(sample, jpg=None, meta=None, arrays=None):
    key, j, m, a = sample
    return (key, j if jpg is None else jpg, m if meta is None else meta, a if arrays is None else arrays)


def _cut_jpeg() -> bytes:
    data = _jpg(7)
    return data[: len(data) // 2]  # the header reads (its size is known), the pixels do not


def _nan_embedding():
    emb = _emb(3)
    emb[5] = np.nan
    return emb


# (key, the damage, the reason it is counted under)
DAMAGES = [
    ("json_list", lambda s: _with(s, meta=[1, 2]), "json"),
    ("crop_text", lambda s: _with(s, meta={**s[2], "crop": "abc"}), "crop"),
    ("crop_short", lambda s: _with(s, meta={**s[2], "crop": [5]}), "crop"),
    ("crop_nan", lambda s: _with(s, meta={**s[2], "crop": [0, 0, float("nan"), 5]}), "crop"),
    ("names_number", lambda s: _with(s, meta={**s[2], "name": 5}), "json"),
    ("caption_dict", lambda s: _with(s, meta={**s[2], "caption_en": {"a": 1}}), "json"),
    ("box_nan", lambda s: _with(s, arrays={**s[3], "bboxes": [[float("nan"), 1, 30, 30]]}), "box_not_finite"),
    ("box_outside", lambda s: _with(s, arrays={**s[3], "bboxes": [[5000, 4000, 5600, 4700]]}), "box_outside"),
    ("box_negative", lambda s: _with(s, arrays={**s[3], "bboxes": [[-60, -50, -10, -5]]}), "box_outside"),
    ("box_inverted", lambda s: _with(s, arrays={**s[3], "bboxes": [[40, 40, 10, 10]]}), "box_inverted"),
    ("box_shape", lambda s: _with(s, arrays={**s[3], "bboxes": [[1, 2, 3]]}), "box_shape"),
    ("emb_nan", lambda s: _with(s, arrays={**s[3], "embeddings": [_nan_embedding()]}), "embedding_not_finite"),
    ("emb_zero", lambda s: _with(s, arrays={**s[3], "embeddings": [np.zeros(512, np.float32)]}), "embedding_norm"),
    ("emb_huge", lambda s: _with(s, arrays={**s[3], "embeddings": [_emb(1) * 1e30]}), "embedding_norm"),
    ("emb_shape", lambda s: _with(s, arrays={**s[3], "embeddings": [np.ones(128, np.float32)]}), "embedding_shape"),
    ("jpg_garbage", lambda s: _with(s, jpg=b"not a jpeg at all"), "image_unreadable"),
]


@pytest.mark.parametrize("key, damage, reason", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_each_bad_sample_is_refused_naming_shard_member_and_reason(tmp_path, key, damage, reason):
    shard = tmp_path / "re_000007.tar"
    write_shard(shard, [damage(_good(key))])
    ((got_key, members),) = list(iter_tar_samples(str(shard)))
    with pytest.raises(ShardFormatError, match=f"re_000007.tar:{key}") as info:
        parse_sample(str(shard), got_key, members)
    assert info.value.reason == reason
    assert "\n" not in str(info.value)  # one line


def test_a_good_sample_still_reads_with_an_edge_box_and_an_empty_crop(tmp_path):
    shard = tmp_path / "re_000000.tar"
    edge = _with(
        _good("edge"),
        meta={"caption_en": "x", "name": "ann", "crop": []},
        arrays={"bboxes": [[-4.0, 60.0, 30.0, 84.0]], "embeddings": [_emb(1)]},
    )  # a face at the border
    write_shard(shard, [edge])
    ((key, members),) = list(iter_tar_samples(str(shard)))
    sample = parse_sample(str(shard), key, members)
    assert sample.persons[0].box == (-4.0, 60.0, 30.0, 84.0) and sample.persons[0].name == "ann"


def _damaged_shards(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Four shards: good samples with every damage of DAMAGES, a cut JPEG (decodes only in the worker),
    and a tar truncated in the middle of a member. Returns the shards and {where: reason} of the bad."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    shards = []
    for s in range(3):
        samples = [_good(f"{s}good{k}", seed=100 * s + k, n=1) for k in range(6)]
        for i, (key, damage, reason) in enumerate(DAMAGES):
            if i % 3 == s:
                samples.insert(i % 5, damage(_good(key, seed=900 + i)))
                expected[f"re_{s:06d}.tar:{key}"] = reason
        if s == 1:
            samples.insert(2, _with(_good("jpg_cut", seed=77), jpg=_cut_jpeg()))
            expected["re_000001.tar:jpg_cut"] = "image_unreadable"
        path = folder / f"re_{s:06d}.tar"
        write_shard(path, samples)
        shards.append(str(path))
    cut = folder / "re_000003.tar"
    write_shard(cut, [_good(f"3good{k}", seed=300 + k) for k in range(6)])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])  # mid-member: tarfile's "unexpected end of data"
    shards.append(str(cut))
    expected["re_000003.tar"] = "shard_unreadable"
    return shards, expected


def _short(where: str) -> str:
    return where.rsplit("/", 1)[-1]


def test_stream_in_workers_skips_and_names_every_bad_sample_and_a_truncated_shard(tmp_path):
    shards, expected = _damaged_shards(tmp_path / "shards")
    stream = MultiID2MStream(shards, OPTIONS, batch_size=2, seed=1, shuffle_buffer=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    ledger = SkipLedger(max_fraction=1.0, path=tmp_path / "skipped.jsonl")
    batches = iter(loader)
    good = 0
    for _ in range(30):  # well over one epoch of each worker
        batch = next(batches)
        ledger.add(batch["bad"])
        ledger.seen(batch["read"])
        good += batch["size"]
        assert batch["size"] == 0 or torch.isfinite(batch["gt_embeddings"]).all()
        assert batch["size"] == 0 or torch.isfinite(batch["boxes"]).all()
    named = {_short(where): reason for where, reason, _ in ledger.entries}
    assert named == {k: v for k, v in expected.items()}  # every bad one, under its reason, nothing else
    assert all("re_0000" in message for _, _, message in ledger.entries)  # each message names its shard
    listed = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {_short(e["where"]) for e in listed} == set(expected)
    truncated = next(m for w, _, m in ledger.entries if w.endswith("re_000003.tar"))
    assert "unexpected end of data" in truncated and "truncated or damaged" in truncated
    assert good > 0 and ledger.read > good
    assert "shard_unreadable" in ledger.summary() and "box_outside" in ledger.summary()


def test_too_many_bad_samples_stop_the_run_listing_them():
    ledger = SkipLedger(max_fraction=0.01, min_samples=200)
    ledger.seen(100)
    ledger.add(
        [
            ("s.tar:a", "box_outside", "s.tar:a: face box lies outside"),
            ("s.tar:b", "json", "s.tar:b.json: x"),
            ("s.tar:c", "json", "s.tar:c.json: y"),
        ]
    )
    ledger.check()  # 100 read: too few to judge yet
    ledger.seen(100)
    with pytest.raises(
        BadDataError,
        match=r"(?s)3 of 200 samples read were bad \(1.50 %, above data.max_bad_fraction "
        r"= 1 %\); by reason: box_outside 1, json 2.*\[box_outside\] s.tar:a: face box lies outside\n",
    ):
        ledger.check()
    ok = SkipLedger(max_fraction=0.05)
    ok.seen(3)
    ok.add([("s.tar:a", "json", "m")])
    ok.check()  # mid-run: too few to judge
    with pytest.raises(BadDataError, match="raise data.max_bad_fraction"):
        ok.check(final=True)  # the end of a run judges whatever was read


def test_compressed_shards_say_what_to_do(tmp_path):
    (tmp_path / "re_000000.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(
        FileNotFoundError,
        match=r"compressed .tar.gz shards are not supported: gunzip them to .tar "
        r"\(e.g. `gunzip -k .*re_000000.tar.gz`",
    ):
        expand_shards(str(tmp_path / "re_*.tar.gz"))
    write_shard(tmp_path / "re_000000.tar", [_good("a")])
    assert expand_shards(str(tmp_path / "re_*")) == [str(tmp_path / "re_000000.tar")]  # the gunzipped one is used


def test_a_tar_cut_at_a_member_boundary_is_named_too(tmp_path):
    path = tmp_path / "re_000000.tar"
    write_shard(path, [_good(f"k{k}", seed=k) for k in range(3)])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cut = members[4].offset  # the header of the second sample's .json: tarfile alone would end quietly
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardFormatError, match=r"re_000000.tar: unreadable tar after sample k0 .*no end-of-archive"):
        list(iter_tar_samples(str(path)))


def test_the_sample_step_passes_over_an_invalid_first_sample(tmp_path, caplog):
    from train.sampling import pick_sample_item

    shard = tmp_path / "re_000000.tar"
    first = _with(_good("first", seed=1), arrays={"bboxes": [[10, 12, 40, 44]], "embeddings": [_nan_embedding()]})
    write_shard(shard, [first, _with(_good("second", seed=2), jpg=_cut_jpeg()), _good("third", seed=3)])
    with caplog.at_level(logging.WARNING):
        item = pick_sample_item(OPTIONS, shards=[str(shard)])
    assert item["key"].endswith(":third")
    text = caplog.text
    assert "re_000000.tar:first" in text and "embedding holds NaN" in text and "re_000000.tar:second" in text


def _manifest_line(image: str, width=96, height=80, box=(10, 12, 40, 44), emb=None, identity="ann") -> dict:
    return {
        "image": image,
        "caption": "c",
        "width": width,
        "height": height,
        "persons": [
            {
                "identity": identity,
                "box": list(box),
                "landmarks": [[20, 20]] * 5,
                "embedding": [float(v) for v in (_emb(1) if emb is None else emb)],
            }
        ],
    }


def test_manifest_bad_lines_are_skipped_and_named_by_the_trainer_s_lenient_load(tmp_path, caplog):
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):
        (tmp_path / name).write_bytes(_jpg(seed))
    lines = [
        json.dumps(_manifest_line("a.jpg")),
        "[1, 2]",
        json.dumps(_manifest_line("b.jpg", box=(500, 400, 560, 470))),
        '{"image": "x.jpg", ',
        json.dumps(_manifest_line("b.jpg", emb=[0.0] * 512)),
        json.dumps(_manifest_line("c.jpg", identity="bob")),
        json.dumps(_manifest_line("b.jpg", emb=_nan_embedding())),  # json writes NaN, and reads it back
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken bytes\n")
    assert "NaN" in lines[6]
    with pytest.raises(Exception, match="line 2"):
        Manifest.load(path)  # strict (prepare, tools): the first bad line stops it
    with caplog.at_level(logging.WARNING):
        manifest = Manifest.load(path, strict=False)
    assert [r.image for r in manifest.records] == ["a.jpg", "c.jpg"] and manifest.lines == [1, 6]
    assert [(w, r) for w, r, _ in manifest.bad] == [
        ("manifest.jsonl line 2", "manifest_line"),
        ("manifest.jsonl line 3", "box_outside"),
        ("manifest.jsonl line 4", "json"),
        ("manifest.jsonl line 5", "embedding_norm"),
        ("manifest.jsonl line 7", "manifest_line"),
        ("manifest.jsonl line 8", "json"),
    ]
    assert "line 7, person 1: embedding must be 512 finite numbers" in manifest.bad[4][2]
    assert all(f"line {n}" in caplog.text for n in (2, 3, 4, 5, 7, 8))


def test_manifest_items_that_fail_are_skipped_naming_the_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpg(1))
    Image.open(io.BytesIO(_jpg(2))).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b.jpg")  # now 80x96
    (tmp_path / "c.jpg").write_bytes(_cut_jpeg())
    lines = [_manifest_line("a.jpg"), _manifest_line("b.jpg", identity="bob"), _manifest_line("c.jpg", identity="cy")]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = WithAnyoneDataset(Manifest.load(path, strict=False), OPTIONS)
    batch = collate([dataset[i] for i in range(3)])
    assert batch["size"] == 1
    assert [(w, r) for w, r, _ in batch["bad"]] == [
        ("manifest.jsonl line 2 (b.jpg)", "image_size_mismatch"),
        ("manifest.jsonl line 3 (c.jpg)", "image_unreadable"),
    ]
    assert "Prepare it again" in batch["bad"][0][2]


def test_cluster_centres_and_references_validate_what_they_read(tmp_path, caplog):
    centres = tmp_path / "cluster_centers"
    centres.mkdir()
    np.save(centres / "ann.npy", _emb(1))
    np.save(centres / "bob.npy", _nan_embedding())
    np.save(centres / "cy.npy", np.ones(100, np.float32))
    (centres / "dee.npy").write_bytes(b"garbage")
    skipped: list = []
    with caplog.at_level(logging.WARNING):
        got = read_cluster_centres(centres, skipped)
    assert list(got) == ["ann"]
    assert {(Path(w).name, r) for w, r, _ in skipped} == {
        ("bob.npy", "embedding_not_finite"),
        ("cy.npy", "embedding_shape"),
        ("dee.npy", "format"),
    }
    npy = save_pickled_npy({"embeddings": [_emb(2)]})
    with pytest.raises(ShardFormatError, match="ref/ann/1: its .json must be an object"):
        reference_entry(npy, b"[1]", "ref/ann/1")
    with pytest.raises(ShardFormatError, match="ref/ann/1: .*not finite"):
        reference_entry(npy, json.dumps({"bboxes": [[float("nan"), 0, 3, 3]]}).encode(), "ref/ann/1")
    with pytest.raises(ShardFormatError, match="no embedding"):
        reference_entry(save_pickled_npy({"embeddings": []}), None, "ref/ann/1")
    assert load_npy(npy, "x")["embeddings"][0].shape == (512,)


def test_a_damaged_landmark_cache_is_detected_again_and_bad_rows_leave_the_loss(tmp_path):
    from train.data.multiid2m import landmark_file

    shard = str(tmp_path / "re_000000.tar")
    target = landmark_file(tmp_path, shard)
    target.write_text(
        json.dumps({"landmarks": {"a": [[[1, 2]] * 5, [[float("nan"), 1]] * 5, [[1, 2]] * 4], "b": [None]}})
    )
    assert load_landmarks([shard], tmp_path)[(shard, "a")] == [[[1, 2]] * 5, None, None]
    target.write_text("{broken")
    assert load_landmarks([shard], tmp_path) == {}


# ------------------------------------------------------------------ a whole run over damaged shards
CONFIG = ROOT / "train" / "configs" / "smoke-multiid2m.yaml"


def _damaged_smoke_shards(root: Path, folder: Path) -> dict[str, str]:
    """The smoke set's shards (written by multiid2m.write) with DAMAGES inserted, the very first sample's
    embedding made NaN (the sample the periodic sample step used to read), a cut JPEG, and the last shard
    truncated mid-member. Returns {where: reason} of every bad sample."""
    folder.mkdir(parents=True)
    sources = sorted((root / "multiid2m" / "train").glob("re_*.tar"))
    expected: dict[str, str] = {}
    for i, source in enumerate(sources):
        samples = [
            (key, m["jpg"], json.loads(m["json"]), load_npy(m["npy"], key)) for key, m in iter_tar_samples(str(source))
        ]
        name = source.name
        base = samples[-1]  # a good sample of this shard: the damaged ones are copies of it
        if i == 0:
            key, jpg, meta, arrays = samples[0]
            embeddings = np.array(arrays["embeddings"], dtype=np.float32)
            embeddings[0, 7] = np.nan
            samples[0] = (key, jpg, meta, {**arrays, "embeddings": embeddings})
            expected[f"{name}:{key}"] = "embedding_not_finite"
        if i < len(sources) - 1:
            for k, (bad, damage, reason) in enumerate(DAMAGES):
                if k % (len(sources) - 1) == i:
                    samples.insert(1 + k % 3, damage((f"bad_{bad}", *base[1:])))
                    expected[f"{name}:bad_{bad}"] = reason
        if i == 1:
            samples.insert(2, ("bad_jpg_cut", base[1][: len(base[1]) // 2], *base[2:]))
            expected[f"{name}:bad_jpg_cut"] = "image_unreadable"
        write_shard(folder / name, samples)
    last = folder / sources[-1].name
    data = last.read_bytes()
    last.write_bytes(data[: len(data) * 2 // 3])
    expected[last.name] = "shard_unreadable"
    return expected


def test_a_run_over_damaged_shards_finishes_with_a_finite_adapter_naming_every_skipped_sample(tmp_path, caplog):
    from safetensors.torch import load_file

    from train import run
    from train.smoke_data import build_smoke_set

    root = build_smoke_set(ROOT / ".cache" / "smoke")
    expected = _damaged_smoke_shards(root, tmp_path / "shards")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO):
        mp.setenv("WITHANYONE_SHARDS", str(tmp_path / "shards" / "re_*.tar"))
        mp.setenv("WITHANYONE_LANDMARKS", str(tmp_path / "landmarks"))  # detected anew, over the damaged shards
        run.main(
            [
                "--config",
                str(CONFIG),
                "--set",
                f"output_dir={out}",
                "--set",
                "data.max_bad_fraction=0.9",
                "--set",
                "phases.1.steps=7",
            ]
        )
    final = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert final.name == "step-9"
    adapter = load_file(final / "withanyone.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))
    assert (out / "samples" / "step-000004.png").is_file()  # the sample step passed over the NaN first sample
    # every sample the run skipped is listed, named, under the reason it was damaged with
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert listed
    for entry in listed:
        assert expected[_short(entry["where"])] == entry["reason"], entry
    named = {_short(e["where"]) for e in listed}
    # read inside a DataLoader worker: the cut JPEG (fails only when decoded) and the truncated shard
    assert {"re_000001.tar:bad_jpg_cut", "re_000004.tar", "re_000000.tar:000000000"} <= named
    assert len(named) >= len(expected) * 2 // 3  # 9 steps read most of the data (each worker's share differs)
    # and every bad one is named in the log (the landmark pass at start-up reads them all)
    for where in expected:
        assert where in caplog.text, where
    assert "skipped" in caplog.text and "bad sample(s) of" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_truncated_reference_tar_keeps_what_was_read_whole_and_names_the_rest(tmp_path, caplog):
    from train.data.multiid2m.references import open_references

    path = tmp_path / "ref_000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("alice", "bob"):
            for suffix, data in (
                ("npy", save_pickled_npy({"embeddings": [_emb(len(name))]})),
                ("json", json.dumps({"bboxes": [[10, 12, 40, 44]]}).encode()),
                ("jpg", _jpg(1)),
            ):
                info = tarfile.TarInfo(f"untar/{name}/1.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = [m for m in tar.getmembers() if m.name == "untar/bob/1.jpg"][0].offset_data + 100
    path.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING):
        refs = open_references(str(tmp_path / "ref_*.tar"), tmp_path / "cache")
    assert refs.names() == ["alice", "bob"]
    assert refs.read(refs.files("alice")[0])[1] == (10.0, 12.0, 40.0, 44.0)
    assert "ref_000.tar is truncated or damaged after untar/bob/1.json" in caplog.text
    assert refs.image(refs.files("alice")[0]).shape == (80, 96, 3)
    with pytest.raises(FileNotFoundError):
        refs.image(refs.files("bob")[0])  # its photo was cut off: the stream counts it as unreadable


def test_a_prepared_negative_pool_with_broken_rows_loses_only_those(tmp_path, caplog):
    from safetensors.torch import save_file

    from train.data import NegativePool

    embeddings = torch.stack([torch.from_numpy(_emb(i)) for i in range(4)])
    embeddings[1, 3] = float("nan")
    embeddings[2] *= 1e30
    save_file({"embeddings": embeddings, "identity_ids": torch.arange(4)}, str(tmp_path / "negatives.safetensors"))
    with caplog.at_level(logging.WARNING):
        pool = NegativePool.load(tmp_path / "negatives.safetensors")
    assert pool.identity_ids.tolist() == [0, 3] and torch.isfinite(pool.embeddings).all()
    assert "negatives.safetensors: skipping 2 of 4 negative embeddings" in caplog.text and "rows [1, 2]" in caplog.text
    save_file({"embeddings": embeddings[1:2], "identity_ids": torch.arange(1)}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="nan.safetensors: every one of its 1 embeddings is non-finite"):
        NegativePool.load(tmp_path / "nan.safetensors")


@pytest.mark.parametrize(
    "setting, match",
    [
        ("data.max_bad_fraction=1.5", r"data.max_bad_fraction must be in \[0, 1\]; got 1.5"),
        ("data.max_bad_fraction=-0.1", r"data.max_bad_fraction must be in \[0, 1\]; got -0.1"),
        ("data.max_bad_fraction=.nan", "data.max_bad_fraction must be a finite number; got nan"),
        ("data.max_image_pixels=-1", "data.max_image_pixels must be >= 0; got -1"),
        ("data.max_image_pixels=1.5", r"data.max_image_pixels: expected int \(a whole number\), got 1.5"),
    ],
)
def test_the_data_limits_are_range_checked(tmp_path, monkeypatch, setting, match):
    from train.config import ConfigError, load_config

    monkeypatch.setenv("WITHANYONE_SHARDS", str(tmp_path / "re_*.tar"))  # (named in the config's comment too)
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, [f"output_dir={tmp_path}", setting])
    config = load_config(CONFIG, [f"output_dir={tmp_path}"])
    assert config.data.max_bad_fraction == 0.01 and config.data.max_image_pixels == 150_000_000


def test_a_run_with_more_bad_samples_than_allowed_stops_listing_them(tmp_path, caplog):
    from train import run
    from train.smoke_data import build_smoke_set

    root = build_smoke_set(ROOT / ".cache" / "smoke")
    expected = _damaged_smoke_shards(root, tmp_path / "shards")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WITHANYONE_SHARDS", str(tmp_path / "shards" / "re_*.tar"))
        mp.setenv("WITHANYONE_LANDMARKS", str(tmp_path / "landmarks"))
        with pytest.raises(SystemExit) as info:  # the default data.max_bad_fraction: 1 %
            run.main(
                [
                    "--config",
                    str(CONFIG),
                    "--set",
                    f"output_dir={out}",
                    "--set",
                    "phases.1.steps=1",
                    "--set",
                    "data.num_workers=0",
                ]
            )
    assert info.value.code == 1  # stopped with its message, not a traceback
    stops = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "withanyone.train"]
    assert len(stops) == 1
    message = stops[0]
    assert "above data.max_bad_fraction = 1 %" in message and "raise data.max_bad_fraction" in message
    listed = [line.strip() for line in message.splitlines()[1:]]
    assert listed and all(any(where in line for where in expected) for line in listed)
    assert (out / "checkpoints" / "step-3" / "withanyone.safetensors").is_file()  # what was trained is kept
