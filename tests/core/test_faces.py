"""Face analysis through the real insightface + onnxruntime code on tiny antelopev2 stand-ins.

The tiny detector (withanyone_core/testing/faces.py) reports exactly known boxes and
landmarks for faces painted on test images, so crops and alignment are checked exactly.
"""

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from withanyone_core.faces import (
    ANTELOPEV2_FILES,
    Face,
    FaceAnalyzer,
    FaceIndexError,
    FaceModelsNotFound,
    ImageReadError,
    NoFaceError,
    arcface_crop,
    find_antelopev2_dir,
    layout_boxes_from_image,
    layout_from_photo,
    load_image,
    select_face,
    siglip_crop,
)
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image, paint_face, remove_green


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    build_tiny_antelopev2(root)
    return root


@pytest.fixture(scope="module")
def analyzer(models_root):
    return FaceAnalyzer(models_root, providers="cpu")


def test_detects_known_boxes_and_landmarks(analyzer):
    image, boxes, landmarks = make_face_image([(4, 5), (13, 7), (9, 14)])
    faces = analyzer.analyze(image)
    assert len(faces) == 3
    got = sorted(faces, key=lambda f: f.bbox[0])
    order = np.argsort(boxes[:, 0])
    for face, k in zip(got, order):
        np.testing.assert_allclose(face.bbox, boxes[k], atol=1e-3)
        np.testing.assert_allclose(face.kps, landmarks[k], atol=1e-3)
        assert face.score > 0.99 and face.embedding.shape == (512,)
        np.testing.assert_allclose(np.linalg.norm(face.normed_embedding), 1.0, atol=1e-5)


def test_same_identity_same_embedding_different_identity_differs(analyzer):
    a, _, _ = make_face_image([(4, 5)], identities=[7], seed=1)
    b, _, _ = make_face_image([(12, 9)], identities=[7], seed=2)
    c, _, _ = make_face_image([(4, 5)], identities=[8], seed=1)
    ea, eb, ec = (analyzer.analyze(x)[0].normed_embedding for x in (a, b, c))
    assert float(ea @ eb) > 0.99  # the crop's edge sees a little of the background
    assert float(ea @ ec) < 0.3


def test_arcface_crop_is_insightface_alignment(analyzer):
    import cv2
    from skimage.transform import SimilarityTransform

    image, _, landmarks = make_face_image([(6, 6)])
    face = analyzer.analyze(image)[0]
    crop = arcface_crop(image, face)
    template = np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    )
    tform = SimilarityTransform.from_estimate(landmarks[0], template)
    expected = cv2.warpAffine(image, tform.params[:2], (112, 112), borderValue=0.0)
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - expected.astype(int)).max() <= 1


def test_siglip_crop_is_the_reference_square_crop():
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    crop = siglip_crop(image, np.array([100.7, 50.2, 160.9, 170.5]))  # 60 x 120 -> square 120 about the centre
    expected = Image.fromarray(image[50:170, 70:190]).resize((512, 512), Image.LANCZOS)
    assert np.array_equal(crop, np.asarray(expected))
    edge = siglip_crop(image, np.array([380, 10, 400, 90]))  # squared box clipped at the right edge
    expected = Image.fromarray(image[10:90, 350:400]).resize((512, 512), Image.LANCZOS)
    assert np.array_equal(edge, np.asarray(expected))


def _face(x1, y1, side, score):
    box = np.array([x1, y1, x1 + side, y1 + side], dtype=np.float32)
    return Face(bbox=box, kps=np.zeros((5, 2), np.float32), score=score)


def test_selection_highest_score_by_default_largest_left_to_right_and_index(caplog):
    small_sure, big_unsure, left = _face(300, 50, 80, 0.95), _face(150, 60, 200, 0.62), _face(10, 40, 120, 0.81)
    faces = [big_unsure, left, small_sure]  # the detector's order (largest first) is not the choice
    with caplog.at_level(logging.WARNING):
        assert select_face(faces, image_name="group.jpg") is small_sure  # the authors' choice
    assert "group.jpg has 3 faces; took the face with the highest detection score" in caplog.text
    assert "score 0.95" in caplog.text and "score 0.62" in caplog.text  # the chosen one and the others
    assert select_face(faces, choice="largest") is big_unsure
    assert select_face(faces, choice="left to right") is left
    assert select_face(faces, index=1) is left  # second-highest score
    assert select_face(faces, index=2, choice="largest") is small_sure
    assert select_face(faces, index=-1) is small_sure  # -1 from older workflows: the first
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        select_face([small_sure], image_name="solo.jpg")
    assert caplog.text == ""  # one face: nothing to explain
    with pytest.raises(ValueError, match="face choice must be one of highest score, largest, left to right"):
        select_face(faces, choice="biggest")


def test_selection_min_size_index_errors_and_singular_wording(caplog):
    faces = [_face(0, 0, 200, 0.7), _face(300, 0, 40, 0.99)]
    with caplog.at_level(logging.WARNING):
        assert select_face(faces, min_size=64, image_name="a.jpg") is faces[0]  # the sure but tiny one is ignored
    assert "a.jpg has 1 usable face (1 more under 64 px ignored)" in caplog.text
    with pytest.raises(FaceIndexError, match=r"face index 1 requested but only 1 face is usable"):
        select_face(faces, index=1, min_size=64, image_name="a.jpg")
    with pytest.raises(FaceIndexError, match=r"only 2 faces are usable"):
        select_face(faces, index=2, image_name="a.jpg")
    with pytest.raises(NoFaceError, match=r"a.jpg: 1 face found but it is smaller than 100 px, the minimum face size"):
        select_face(faces[1:], min_size=100, image_name="a.jpg")
    with pytest.raises(NoFaceError, match=r"2 faces found but all are smaller than 300 px, the minimum face size"):
        select_face(faces, min_size=300, image_name="a.jpg")


def test_no_face_message_states_the_actual_minimum_size():
    expected = r"no face found in ref\.png at detection threshold 0\.55: .* at least 96 px wide"
    with pytest.raises(NoFaceError, match=expected):
        select_face([], min_size=96, image_name="ref.png", det_thresh=0.55)
    with pytest.raises(NoFaceError) as err:
        select_face([], min_size=0, image_name="ref.png")
    assert "64 px" not in str(err.value) and "px wide" not in str(err.value)


def test_no_face_names_the_image(analyzer):
    blank = np.full((480, 640, 3), 128, dtype=np.uint8)
    assert analyzer.analyze(blank) == []
    with pytest.raises(NoFaceError, match="no face found in ref_2.png: use a photo"):
        select_face(analyzer.analyze(blank), image_name="ref_2.png")


def test_large_image_detected_downscaled_cropped_at_full_resolution(analyzer):
    image, boxes, landmarks = make_face_image([(5, 5), (12, 12)], size=4480)  # 7x the detector's canvas
    faces = sorted(analyzer.analyze(image), key=lambda f: f.bbox[0])
    np.testing.assert_allclose(np.stack([f.bbox for f in faces]), boxes, rtol=0, atol=4.0)
    crop = siglip_crop(image, faces[0])
    assert crop.shape == (512, 512, 3)
    np.testing.assert_allclose(faces[0].kps, landmarks[0], atol=4.0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16bit_files(tmp_path, mode):
    image, _, _ = make_face_image([(6, 6)])
    if mode == "L":
        pil = Image.fromarray(image).convert("L")
    elif mode == "RGBA":
        pil = Image.fromarray(image).convert("RGBA")
    else:
        pil = Image.fromarray(image[..., 0].astype(np.uint16) * 257)
    path = tmp_path / "face.png"
    pil.save(path)
    loaded = load_image(path)
    assert loaded.shape == (640, 640, 3) and loaded.dtype == np.uint8
    if mode == "RGBA":
        assert np.array_equal(loaded, image)
    if mode == "I;16":
        assert np.array_equal(loaded[..., 0], image[..., 0])


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg could not be read"):
        load_image(bad)
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_folder_layouts_and_missing_files(tmp_path, models_root):
    src = find_antelopev2_dir(models_root)
    nested = tmp_path / "nested" / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(src, nested)
    assert find_antelopev2_dir(tmp_path / "nested") == nested  # the layout the release zip produces
    partial = tmp_path / "partial" / "models" / "antelopev2"
    partial.mkdir(parents=True)
    shutil.copy(src / "glintr100.onnx", partial)
    with pytest.raises(FaceModelsNotFound) as err:
        find_antelopev2_dir(tmp_path / "partial")
    message = str(err.value)
    assert "lacks scrfd_10g_bnkps.onnx" in message and all(name in message for name in ANTELOPEV2_FILES)
    with pytest.raises(FaceModelsNotFound, match="models/insightface/models/antelopev2"):
        FaceAnalyzer(tmp_path / "empty")


def test_provider_choice(models_root):
    import onnxruntime

    analyzer = FaceAnalyzer(models_root, providers="auto")
    expected = (
        "CUDAExecutionProvider"
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        else "CPUExecutionProvider"
    )
    assert analyzer.providers[0] == expected
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            FaceAnalyzer(models_root, providers="cuda")


def test_real_photo_end_to_end(analyzer):
    """insightface's own group photo with faces painted where the tiny detector sees them."""
    from pathlib import Path

    import insightface

    photo = load_image(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg")
    canvas = remove_green(np.asarray(Image.fromarray(photo).resize((640, 640))))
    assert analyzer.analyze(canvas) == []  # only painted faces are seen
    box, landmarks = paint_face(canvas, 10, 8, identity=3)
    faces = analyzer.analyze(canvas, image_name="t1.jpg")
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, box, atol=1e-3)
    assert siglip_crop(canvas, faces[0]).shape == (512, 512, 3)
    assert arcface_crop(canvas, faces[0]).shape == (112, 112, 3)


def test_layout_from_image(analyzer):
    image, boxes, _ = make_face_image([(13, 7), (4, 5)])
    layout = layout_boxes_from_image(analyzer, image, width=1024, height=512)
    assert len(layout) == 2 and layout[0][0] < layout[1][0]  # left to right
    for x1, y1, x2, y2 in layout:
        assert abs((x2 - x1) - (y2 - y1)) < 1e-6 and 0 <= x1 < x2 <= 1024 and 0 <= y1 < y2 <= 512
    # the authors' framing: the 640x640 photo is its own square window, scaled by 512/640 and centred
    # horizontally in the 1024x512 output (offset 256)
    left = boxes[np.argmin(boxes[:, 0])]
    np.testing.assert_allclose(layout[0], left * 0.8 + np.array([256, 0, 256, 0]), atol=1e-4)
    with pytest.raises(NoFaceError, match="layout image"):
        layout_boxes_from_image(analyzer, np.full((200, 200, 3), 90, np.uint8), 512, 512)


def test_layout_people_keeps_the_highest_scores_left_to_right(analyzer, caplog):
    image, boxes, _ = make_face_image([(3, 5), (10, 6), (16, 5)])
    # a dimmer marker on the middle face: the tiny detector is less sure of it
    image[6 * 32 : 7 * 32, 10 * 32 : 11 * 32] = (95, 165, 95)
    faces = analyzer.analyze(image, embed=False)
    scores = sorted(f.score for f in faces)
    assert len(faces) == 3 and scores[0] < 0.95 < scores[1]
    with caplog.at_level(logging.WARNING):
        placed = layout_from_photo(analyzer, image, 768, 768, max_faces=2)
    assert [f.bbox[0] for f in placed.faces] == sorted(f.bbox[0] for f in placed.faces)  # left to right
    assert {round(float(f.bbox[0])) for f in placed.faces} == {round(float(boxes[0][0])), round(float(boxes[2][0]))}
    assert len(placed.dropped) == 1 and round(float(placed.dropped[0].bbox[0])) == round(float(boxes[1][0]))
    kept = "the layout image has 3 faces; kept the 2 faces with the highest detection scores (people = 2)"
    assert kept in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(layout_from_photo(analyzer, image, 768, 768, max_faces=4).boxes) == 3
    assert "has only 3 faces but people = 4: the layout has 3 boxes" in caplog.text


def test_torch_arcface_matches_onnxruntime_and_has_gradients(analyzer, models_root):
    from withanyone_core.faces.torch_arcface import TorchArcFace, align_faces, numpy_crop_to_tensor

    image, _, _ = make_face_image([(6, 6), (14, 10)], identities=[1, 2])
    faces = analyzer.analyze(image)
    torch_arc = TorchArcFace.from_onnx(find_antelopev2_dir(models_root) / "glintr100.onnx")
    for face in faces:
        emb = torch_arc(numpy_crop_to_tensor(arcface_crop(image, face))).detach().numpy()[0]
        cos = float(emb @ face.embedding / np.linalg.norm(emb) / np.linalg.norm(face.embedding))
        assert cos >= 0.999
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).repeat(2, 1, 1, 1).requires_grad_(True)
    kps = torch.from_numpy(np.stack([f.kps for f in faces]))
    aligned = align_faces(pixels, kps)
    for k, face in enumerate(faces):  # differentiable alignment == insightface's norm_crop
        ref = arcface_crop(image, face).astype(np.float32) / 255
        assert np.abs(aligned[k].permute(1, 2, 0).detach().numpy() - ref).max() < 3 / 255
    emb = torch_arc(aligned)
    cos = torch.nn.functional.cosine_similarity(emb, torch.from_numpy(np.stack([f.embedding for f in faces])))
    assert (cos >= 0.999).all()
    (1 - cos).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_siglip_crop_matte_blanks_the_background_like_the_authors_paste_on_black():
    from PIL import Image as PILImage

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    matte = np.zeros((300, 400), np.float32)
    matte[60:160, 110:170] = 1.0  # the person
    matte[160:170, 110:170] = 0.5  # a soft edge
    bbox = np.array([100.7, 50.2, 160.9, 170.5])
    plain, matted = siglip_crop(image, bbox), siglip_crop(image, bbox, matte=matte)
    # the authors: PIL paste of the crop onto black through the matte resized to the crop
    alpha = PILImage.fromarray(matte[50:170, 70:190]).resize((512, 512), PILImage.BILINEAR)
    expected = (plain.astype(np.float32) * np.clip(np.asarray(alpha), 0, 1)[..., None]).round().astype(np.uint8)
    assert np.array_equal(matted, expected)
    assert matted[:, :100].max() == 0  # left of the person: black
    assert np.array_equal(matted[200:300, 250:350], plain[200:300, 250:350])  # inside: untouched
    assert np.array_equal(siglip_crop(image, bbox, matte=np.ones((300, 400), np.float32)), plain)
    with pytest.raises(ValueError, match="does not match the 400x300 image"):
        siglip_crop(image, bbox, matte=np.ones((30, 40), np.float32))
