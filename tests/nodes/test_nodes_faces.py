"""Face Extract, Identity Encode and Multi-ID Layout inside the real ComfyUI modules (in-process).

Real insightface + onnxruntime on the tiny antelopev2 stand-ins and a tiny SigLIP; the node
modules are imported directly (not through the extension's node list) so these tests do not
depend on the other nodes of the pack.
"""

import logging

import numpy as np
import pytest
import torch

from support.comfy_env import tiny_face_models
from withanyone_core.layout import DROPPED_COLOR, parse_boxes, preset_boxes


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    _, analyzer, siglip = tiny_face_models(tmp_path_factory)
    from withanyone_pack.nodes import faces, layout

    return faces, layout, analyzer, siglip


def _image(*arrays):
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255)


def _group(cells, dim=(), identities=None, seed=0):
    """A 640x640 photo with faces at stride-32 cells; faces listed in ``dim`` get a paler marker
    (the tiny detector is less sure of them)."""
    from withanyone_core.testing.faces import make_face_image

    photo, boxes, _ = make_face_image(cells, identities=identities, seed=seed)
    for cx, cy in dim:
        photo[cy * 32 : (cy + 1) * 32, cx * 32 : (cx + 1) * 32] = (95, 165, 95)
    return photo, boxes


def _schema(node):
    schema = node.define_schema()
    return {i.id: i for i in schema.inputs}, schema


def test_face_extract_schema_keeps_old_widgets_first(pack):
    faces, _, _, _ = pack
    inputs, _ = _schema(faces.WithAnyoneFaceExtract)
    # older workflows store [face_index, min_face_size] positionally: they stay the first two widgets
    widgets = [k for k, i in inputs.items() if k not in ("image", "face_analyzer", "mask")]
    assert widgets == ["face_index", "min_face_size", "face_choice", "no_face"]
    assert inputs["face_choice"].default == "highest score" and inputs["face_index"].min == -1
    assert inputs["no_face"].default == "error" and inputs["mask"].optional
    # new widgets are optional: API-format prompts written before them still validate
    assert inputs["face_choice"].optional and inputs["no_face"].optional


def test_face_extract_takes_the_highest_score_and_says_so(pack, caplog):
    faces, _, analyzer, _ = pack
    photo, boxes = _group([(4, 5), (14, 8)], dim=[(4, 5)], identities=[1, 2])
    extract = faces.WithAnyoneFaceExtract
    with caplog.at_level(logging.WARNING):
        out = extract.execute(_image(photo), analyzer, 0, 32)
    chosen = out.result[0].photos[0]
    np.testing.assert_allclose(chosen.bbox, boxes[1], atol=1e-3)  # the sure face, not the first/leftmost
    assert "photo 1 of 1 has 2 faces; took the face with the highest detection score" in caplog.text
    assert out.ui["text"] == ["1 photo used"] and len(out.ui["images"]) == 1
    left = extract.execute(_image(photo), analyzer, 0, 32, face_choice="left to right").result[0].photos[0]
    np.testing.assert_allclose(left.bbox, boxes[0], atol=1e-3)
    second = extract.execute(_image(photo), analyzer, 1, 32).result[0].photos[0]
    np.testing.assert_allclose(second.bbox, boxes[0], atol=1e-3)
    old = extract.execute(_image(photo), analyzer, -1, 32).result[0].photos[0]  # older workflows' -1
    np.testing.assert_allclose(old.bbox, boxes[1], atol=1e-3)
    with pytest.raises(ValueError, match="face index 2 requested but only 2 faces are usable"):
        extract.execute(_image(photo), analyzer, 2, 32, no_face="skip")  # a setting, never skipped


def test_face_extract_four_channel_image(pack):
    faces, _, analyzer, _ = pack
    photo, boxes = _group([(8, 8)])
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    got = faces.WithAnyoneFaceExtract.execute(_image(rgba), analyzer, 0, 32).result[0]
    np.testing.assert_allclose(got.photos[0].bbox, boxes[0], atol=1e-3)
    plain = faces.WithAnyoneFaceExtract.execute(_image(photo), analyzer, 0, 32).result[0]
    assert np.array_equal(got.photos[0].embedding, plain.photos[0].embedding)


def test_face_extract_mask_blanks_the_siglip_background_only(pack):
    faces, _, analyzer, _ = pack
    a, box_a = _group([(6, 6)], seed=1)
    b, box_b = _group([(12, 9)], seed=2)
    extract = faces.WithAnyoneFaceExtract
    plain, plain_preview = extract.execute(_image(a, b), analyzer, 0, 32).result
    masks = torch.zeros(2, 640, 640)
    for k, (x1, y1, x2, y2) in enumerate([box_a[0], box_b[0]]):  # keep the left half of each face box
        masks[k, int(y1) : int(y2), int(x1) : int((x1 + x2) / 2)] = 1.0
    masked, preview = extract.execute(_image(a, b), analyzer, 0, 32, mask=masks).result
    for k in range(2):
        assert np.array_equal(masked.photos[k].embedding, plain.photos[k].embedding)  # ArcFace untouched
        assert masked.photos[k].masked and not plain.photos[k].masked and masked.photos[k].score > 0.9
        crop, original = masked.photos[k].siglip_crop, plain.photos[k].siglip_crop
        assert crop[:, 300:].max() == 0  # the right half of the square crop: black
        assert np.array_equal(crop[20:490, 20:240], original[20:490, 20:240])
    assert torch.equal(preview, torch.from_numpy(np.stack([p.siglip_crop for p in masked.photos])).float() / 255)
    # one mask for every photo, at another resolution (stretched to the photo)
    one = torch.zeros(1, 320, 320)
    one[0, :, :160] = 1.0
    shared = extract.execute(_image(a, b), analyzer, 0, 32, mask=one).result[0]
    assert shared.photos[0].siglip_crop.max() > 0 and shared.photos[1].siglip_crop.max() == 0  # b's face is right
    with pytest.raises(ValueError, match="mask is a batch of 3 but image has 2 photos"):
        extract.execute(_image(a, b), analyzer, 0, 32, mask=torch.ones(3, 640, 640))


def test_face_extract_no_face_policy(pack, caplog):
    faces, _, analyzer, _ = pack
    a, _ = _group([(6, 6)], seed=1)
    b, _ = _group([(12, 9)], seed=2)
    blank = np.full((640, 640, 3), 100, np.uint8)
    extract = faces.WithAnyoneFaceExtract
    with pytest.raises(
        ValueError, match="no face found in photo 2 of 3 at detection threshold 0.40: .*at least 48 px wide"
    ):
        extract.execute(_image(a, blank, b), analyzer, 0, 48)
    with caplog.at_level(logging.WARNING):
        out = extract.execute(_image(a, blank, b), analyzer, 0, 32, no_face="skip")
    got, preview = out.result
    assert [p.image_index for p in got.photos] == [0, 2] and preview.shape == (2, 512, 512, 3)
    assert got.skipped == (1,)
    assert out.ui["text"] == ["2 photos used; skipped (no usable face): photo 2"]
    assert len(out.ui["images"]) == 3  # the skipped photo has its own tile on the node
    assert "skipping photo 2 of 3: no face found in photo 2 of 3" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 photos has a usable face"):
        extract.execute(_image(blank, blank), analyzer, 0, 32, no_face="skip")
    with pytest.raises(ValueError, match="the photo has a usable face|the photo has"):
        extract.execute(_image(blank), analyzer, 0, 32, no_face="skip")


def test_identity_encode_refuses_a_gap(pack):
    faces, _, analyzer, siglip = pack
    a, _ = _group([(6, 6)], identities=[1])
    b, _ = _group([(9, 9)], identities=[2])
    alice = faces.WithAnyoneFaceExtract.execute(_image(a), analyzer, 0, 32).result[0]
    bob = faces.WithAnyoneFaceExtract.execute(_image(b), analyzer, 0, 32).result[0]
    encode = faces.WithAnyoneIdentityEncode
    with pytest.raises(ValueError, match="person_3 is connected but person_2 is not: connect the persons in order"):
        encode.execute(siglip, alice, None, bob)
    with pytest.raises(ValueError, match="person_4 is connected but person_2, person_3 are not"):
        encode.execute(siglip, alice, None, None, bob)
    identities = encode.execute(siglip, alice, bob).result[0]
    assert identities.count == 2


def _wide_photo_with_faces_at_both_edges():
    """A 1920x1080 photo (the detector sees it at 640x360) with a face at each edge and a paler one
    in the middle; the edge faces' textures are cut by the photo's border."""
    from PIL import Image

    from withanyone_core.testing.faces import paint_face, remove_green

    rng = np.random.default_rng(5)
    canvas = remove_green(rng.integers(60, 180, (424, 704, 3), dtype=np.uint8))  # one cell of margin around
    boxes = [paint_face(canvas, cx + 1, cy + 1, identity=k)[0] - 32 for k, (cx, cy) in enumerate([(0, 5), (19, 6)])]
    paint_face(canvas, 10, 5, identity=7)
    canvas[5 * 32 : 6 * 32, 10 * 32 : 11 * 32] = (95, 165, 95)
    photo = canvas[32:392, 32:672]
    wide = np.asarray(Image.fromarray(np.ascontiguousarray(photo)).resize((1920, 1080), Image.NEAREST))
    return wide, np.stack(boxes) * 3


def test_layout_from_a_wide_photo_with_faces_at_both_edges(pack, caplog):
    _, layout, analyzer, _ = pack
    photo, boxes = _wide_photo_with_faces_at_both_edges()
    assert boxes[0][0] < 0 and boxes[1][2] > 1920  # the detections stick out of the photo
    node = layout.WithAnyoneLayout
    with caplog.at_level(logging.WARNING):
        result, preview, person_masks, union = node.execute(768, 768, "image", 2, "", _image(photo), analyzer).result
    assert result.num_persons == 2
    for x1, y1, x2, y2 in result.boxes:
        assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 768
    assert result.boxes[0][0] < result.boxes[1][0]
    # the two surest faces are kept (the pale middle one is left out), and the log says so
    kept = "the layout image has 3 faces; kept the 2 faces with the highest detection scores (people = 2)"
    assert kept in caplog.text
    assert preview.shape == (1, 512, 512, 3)
    assert person_masks.shape == (2, 768, 768) and union.shape == (1, 768, 768)
    for k, (x1, y1, x2, y2) in enumerate(result.boxes):
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        assert person_masks[k, cy, cx] == 1 and person_masks[1 - k, cy, cx] == 0
    assert torch.equal(union[0], person_masks.amax(0))
    # the preview shows the photo under the boxes and the left-out face in grey
    pixels = (preview[0].numpy() * 255).round().astype(np.uint8)
    assert (np.abs(pixels.astype(int) - np.array(DROPPED_COLOR)).sum(-1) == 0).any()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a photo, not a flat canvas
    # 4-channel layout photo (after JoinImageWithAlpha)
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    again = node.execute(768, 768, "image", 2, "", _image(rgba), analyzer).result[0]
    assert again.boxes == result.boxes
    fill = node.execute(1344, 768, "image", 3, "", _image(photo), analyzer, image_framing="fill").result[0]
    assert fill.num_persons == 3 and all(0 <= b[0] < b[2] <= 1344 for b in fill.boxes)


def test_layout_from_a_mask(pack):
    _, layout, _, _ = pack
    mask = torch.zeros(1, 384, 384)
    mask[0, 100:180, 250:330] = 1.0  # right person
    mask[0, 90:170, 40:120] = 1.0  # left person
    result, preview, person_masks, union = layout.WithAnyoneLayout.execute(
        768, 768, "mask", 2, "", None, None, layout_mask=mask
    ).result
    assert [list(b) for b in result.boxes] == [[80.0, 180.0, 240.0, 340.0], [500.0, 200.0, 660.0, 360.0]]
    assert person_masks.shape == (2, 768, 768) and person_masks[0].sum() == 160 * 160
    assert preview.shape == (1, 512, 512, 3)
    with pytest.raises(ValueError, match="source 'mask' needs a layout_mask"):
        layout.WithAnyoneLayout.execute(768, 768, "mask", 2, "", None, None)


def test_layout_defaults_and_bad_box_text(pack):
    _, layout, _, _ = pack
    inputs, schema = _schema(layout.WithAnyoneLayout)
    assert inputs["width"].default == 768 and inputs["height"].default == 768  # the authors' demo size
    assert inputs["source"].options == ["preset", "text", "image", "mask"]
    assert inputs["image_framing"].optional and inputs["image_framing"].default == "square"
    assert [o.display_name for o in schema.outputs] == ["layout", "preview", "person_masks", "mask"]
    preset = layout.WithAnyoneLayout.execute(768, 768, "preset", 2, "", None, None).result[0]
    assert preset.boxes == tuple(tuple(b) for b in preset_boxes(2, 768, 768))
    parse = parse_boxes
    for bad in ("nan,0,10,10", "0,0,inf,10", "0,0,1e400,10", "-inf,0,10,10"):
        with pytest.raises(ValueError, match=r"layout line 2 .*every number must be finite"):
            parse("10,10,50,50\n" + bad, 512, 512)
    with pytest.raises(
        ValueError,
        match=r"layout line 1 \('0.5,0.5,1,2'\) mixes fractions \(0.5, 0.5\) with pixels "
        r"\(2\)",
    ):
        parse("0.5,0.5,1,2", 512, 512)
    assert parse("0,0,1,1", 512, 256) == [(0.0, 0.0, 512.0, 256.0)]  # all within 0..1: fractions
    assert parse("0,0,1,2", 512, 256) == [(0.0, 0.0, 1.0, 2.0)]  # integers beyond 1: pixels
    assert parse("10.5, 20, 100.25, 200", 512, 256) == [(10.5, 20.0, 100.25, 200.0)]
