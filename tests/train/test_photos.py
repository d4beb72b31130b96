"""Photos as people see them: the one photo reader (withanyone_core.faces.images) and prepare.

Real files written by Pillow: an EXIF-rotated JPEG (tag 0x0112), CMYK, palette with
transparency, 16-bit grey, grey+alpha, a 15000 x 15000 PNG; prepare on a folder that holds
its own output.
"""

import io
import json
import logging
from pathlib import Path

import insightface
import numpy as np
import pytest
from PIL import Image

from train import prepare
from train.data import Manifest
from withanyone_core.faces import (
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    image_size,
    load_image,
)
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image

T1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
ORIENTATION = 0x0112


def _rotated_jpeg(upright: Image.Image, path: Path, orientation: int = 6) -> None:
    """Store ``upright`` as a phone does: pixels sideways, EXIF saying how to turn them."""
    stored = {
        6: upright.transpose(Image.Transpose.ROTATE_90),
        8: upright.transpose(Image.Transpose.ROTATE_270),
        3: upright.transpose(Image.Transpose.ROTATE_180),
    }[orientation]
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, "JPEG", quality=98, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = Image.open(T1).convert("RGB")
    path = tmp_path / "phone.jpg"
    _rotated_jpeg(upright, path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (upright.size if orientation == 3 else upright.size[::-1])  # stored sideways
    loaded = load_image(path)
    assert loaded.shape == (upright.size[1], upright.size[0], 3)
    assert np.abs(loaded.astype(float) - np.asarray(upright, dtype=float)).mean() < 3  # JPEG noise only
    assert image_size(path.read_bytes(), "phone.jpg") == upright.size  # the header size, upright
    assert np.array_equal(decode_image(path.read_bytes(), "phone.jpg"), loaded)  # bytes read the same


def _saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_every_colour_mode_becomes_the_same_rgb(tmp_path):
    rgb = Image.open(T1).convert("RGB").resize((320, 220))
    grey = np.asarray(rgb.convert("L"))
    cases = {
        "cmyk.jpg": (_saved(rgb.convert("CMYK"), "JPEG", quality=98), np.asarray(rgb), 6),
        "palette.png": (None, None, 0),
        "grey16.png": (
            _saved(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
            np.repeat(grey[..., None], 3, 2),
            0,
        ),
        "la.png": (
            _saved(Image.merge("LA", (Image.fromarray(grey), Image.new("L", rgb.size, 0))), "PNG"),
            np.repeat(grey[..., None], 3, 2),
            0,
        ),
    }
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    cases["palette.png"] = (_saved(palette, "PNG", transparency=0), np.asarray(palette.convert("RGB")), 0)
    for name, (data, expected, tolerance) in cases.items():
        (tmp_path / name).write_bytes(data)
        with Image.open(tmp_path / name) as raw:
            assert raw.mode in ("CMYK", "P", "I;16", "I", "LA"), (name, raw.mode)
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (220, 320, 3), name
        assert np.abs(got.astype(float) - expected.astype(float)).mean() <= tolerance + 0.01, name


def test_a_dark_16_bit_photo_is_not_read_as_8_bit(tmp_path):
    dark = np.full((40, 60), 200 * 1, np.uint16)  # 16-bit values all <= 255: nearly black, not mid-grey
    (tmp_path / "dark16.png").write_bytes(_saved(Image.fromarray(dark), "PNG"))
    assert load_image(tmp_path / "dark16.png").max() <= 1


def test_an_over_large_image_is_refused_from_its_header(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (15000, 15000), 0).save(huge, optimize=False, compress_level=1)  # a 15000^2 PNG (225 MP)
    with pytest.raises(
        ImageTooLargeError,
        match=r"huge.png is 15000x15000 \(225 megapixels\), above the limit of "
        r"150 megapixels.*--max-image-pixels.*data.max_image_pixels",
    ):
        load_image(huge)
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ImageTooLargeError, match="above the limit of 0.05 megapixels"):
        load_image(small, max_pixels=50_000)  # the limit is a setting
    assert load_image(small, max_pixels=0).shape == (200, 300, 3)  # 0 = no limit
    assert isinstance(ImageTooLargeError("x"), ImageReadError)


def test_a_limit_above_pillows_own_guard_reads_the_image(tmp_path):
    from PIL import Image as PILImage

    saved = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 1000  # as if the photo were above Pillow's decompression-bomb guard
    try:
        path = tmp_path / "big.png"
        Image.new("RGB", (100, 50), (1, 2, 3)).save(path)
        assert load_image(path, max_pixels=10_000)[0, 0].tolist() == [1, 2, 3]
        with pytest.raises(ImageTooLargeError):
            load_image(path, max_pixels=2000)
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved
    assert PILImage.MAX_IMAGE_PIXELS == saved


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    build_tiny_antelopev2(root)
    return root


def _prepare(images: Path, out: Path, models: Path, *extra) -> dict:
    return prepare.main(
        ["--images", str(images), "--out", str(out), "--antelopev2", str(models), "--providers", "cpu", *extra]
    )


def test_prepare_records_a_phone_photo_upright(tmp_path, models):
    canvas, boxes, _ = make_face_image([(5, 6), (14, 8)], identities=[1, 2], seed=3)
    upright = Image.fromarray(canvas[:480])  # 640 wide, 480 high, both faces inside
    photos = tmp_path / "photos"
    photos.mkdir()
    _rotated_jpeg(upright, photos / "phone.jpg", 6)
    upright.save(photos / "same.png")
    _prepare(photos, tmp_path / "data", models)
    records = {r.image.split("/")[-1]: r for r in Manifest.load(tmp_path / "data" / "manifest.jsonl").records}
    phone, same = records["phone.jpg"], records["same.png"]
    assert (phone.width, phone.height) == (640, 480)  # as viewers and ComfyUI show it, not 480x640
    assert len(phone.persons) == 2
    got = np.array([p.box for p in phone.persons])
    assert np.abs(got - np.array([p.box for p in same.persons])).max() < 4  # the upright photo's boxes
    assert np.abs(got - boxes).max() < 4


def test_prepare_never_reads_its_own_output(tmp_path, models):
    photos = tmp_path / "photos"
    (photos / "alice").mkdir(parents=True)
    for k in range(2):
        img, _, _ = make_face_image([(5 + 6 * k, 6)], identities=[1], seed=k)
        Image.fromarray(img).save(photos / "alice" / f"{k}.png")
    img, _, _ = make_face_image([(4, 5), (13, 7)], identities=[1, 2], seed=5)
    Image.fromarray(img).save(photos / "group.png")
    img, _, _ = make_face_image([(8, 8)], identities=[3], seed=6)
    Image.fromarray(img).save(photos / "solo.png")
    out = photos / "data"  # the output inside the photo folder, with the MultiID-2M layout's photos in it
    first = _prepare(photos, out, models, "--format", "multiid2m")
    again = _prepare(photos, out, models, "--format", "multiid2m")
    third = _prepare(photos, out, models, "--format", "multiid2m")
    assert first["records"] == again["records"] == third["records"] == 4
    assert first["identities"] == again["identities"] == third["identities"]
    assert list((out / "multiid2m" / "ref" / "untar").rglob("*.jpg"))  # photos prepare wrote: never read back
    # an output folder moved under the photos later is recognised by its marker
    other = tmp_path / "elsewhere"
    _prepare(photos, other, models)
    (other).rename(photos / "old-run")
    assert _prepare(photos, out, models)["records"] == 4
    with pytest.raises(SystemExit):
        _prepare(photos, photos, models)


def test_prepare_skips_an_over_large_photo_by_name_and_reads_it_when_allowed(tmp_path, models, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    img, _, _ = make_face_image([(8, 8)], identities=[1], seed=1, size=480)
    Image.fromarray(img).save(photos / "fine.png")  # 480 x 480 = 230400 pixels
    img, _, _ = make_face_image([(6, 9)], identities=[1], seed=2)
    Image.fromarray(img).save(photos / "big.png")  # 640 x 640 = 409600 pixels
    with caplog.at_level(logging.WARNING):
        summary = _prepare(photos, tmp_path / "data", models, "--max-image-pixels", "300000")
    assert summary["records"] == 1
    (skipped,) = summary["skipped"]
    assert skipped["image"] == "big.png" and "above the limit of 0.3 megapixels" in skipped["reason"]
    assert any("big.png" in r.getMessage() and "limit" in r.getMessage() for r in caplog.records)
    summary = _prepare(photos, tmp_path / "data", models)  # the rerun with the default limit reads it
    assert summary["records"] == 2 and not summary["skipped"]
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["records"] == 2
