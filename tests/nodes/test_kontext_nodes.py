"""Kontext nodes in the real ComfyUI modules (in-process): Face Edit Prepare, ArcFace Identities, and
WithAnyone.Ke sampling on ComfyUI's own FLUX with a ReferenceLatent.

Real insightface + onnxruntime on the tiny antelopev2 stand-ins (withanyone_core.testing.faces:
faces where the photo has a green 32 px marker); the FLUX is one ComfyUI's loaders accept
(hidden 3072, 1 + 1 blocks, random weights) with a random Ke adapter of that size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.comfy_env import import_comfyui, import_pack

H, W = 64, 96


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    import_comfyui(models)
    import_pack()
    from withanyone_pack.nodes import kontext, loaders, sampling

    from withanyone_core.testing.faces import build_tiny_antelopev2

    loaders.register_model_folders()
    build_tiny_antelopev2(models / "insightface")
    analyzer = loaders.WithAnyoneFaceAnalyzerLoader.execute("CPU", 0.4, 640).result[0]
    return kontext, sampling, analyzer


def _image(array):
    return torch.from_numpy(array.astype(np.float32) / 255)[None]


def _photo(cells, size=1280):
    from withanyone_core.testing.faces import make_face_image

    return make_face_image(cells, seed=1, size=size)


def test_prepare_blurs_the_faces_and_lays_them_out(pack):
    from withanyone_core.faces import edit

    kontext, _, analyzer = pack
    photo, boxes, _ = _photo([(4, 5), (14, 6), (9, 12)])  # 1280 px: faces of 128 px
    ref, layout, preview, count = kontext.WithAnyoneFaceEditPrepare.execute(
        _image(photo), analyzer, "left to right", "authors (0.9-1.1)", 0.0
    ).result
    assert count == 3 and (layout.width, layout.height) == (1280, 1280)
    order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2)
    assert layout.boxes == tuple(tuple(float(v) for v in edit.authors_round_trip(boxes[k], 1280, 1280)) for k in order)
    assert ref.shape == (1, 1280, 1280, 3) and preview.shape[-1] == 3
    pixels = (ref[0].numpy() * 255).round().astype(np.uint8)
    changed = np.any(pixels != photo, axis=-1)
    inside = np.zeros(changed.shape, bool)
    for x1, y1, x2, y2 in layout.boxes:
        inside[int(y1) : int(y2), int(x1) : int(x2)] = True
    assert changed[inside].mean() > 0.5 and not changed[~inside].any()  # only the faces are blurred

    small, small_layout, _, _ = kontext.WithAnyoneFaceEditPrepare.execute(
        _image(photo), analyzer, "left to right", "authors (0.9-1.1)", 0.25
    ).result  # ~512 px
    assert small_layout.width == small.shape[2] == 512 and small_layout.num_persons == 3


def test_prepare_refuses_what_the_authors_refuse_and_lifts_the_aspect_on_request(pack):
    kontext, _, analyzer = pack
    photo, _, _ = _photo([(3, 5), (15, 5)], size=640)
    wide = np.concatenate([photo, photo[:, :320]], axis=1)  # 960 x 640: aspect 1.5
    node = kontext.WithAnyoneFaceEditPrepare
    with pytest.raises(ValueError, match="aspect 1.50"):
        node.execute(_image(wide), analyzer, "left to right", "authors (0.9-1.1)", 0.0)
    ref, layout, _, count = node.execute(_image(wide), analyzer, "left to right", "off", 0.0, "exact").result
    assert (layout.width, layout.height) == (960, 640) and ref.shape == (1, 640, 960, 3)
    assert count == 3  # the copied half holds the first face again
    with pytest.raises(ValueError, match="one photo at a time"):
        node.execute(torch.cat([_image(photo)] * 2), analyzer, "left to right", "authors (0.9-1.1)", 0.0)
    from withanyone_core.faces import NoFaceError
    from withanyone_core.testing.faces import remove_green

    with pytest.raises(NoFaceError, match="no face found in the source photo"):
        node.execute(_image(remove_green(photo)), analyzer, "left to right", "authors (0.9-1.1)", 0.0)


def test_arcface_identities_need_no_siglip(pack):
    from withanyone_pack.nodes.types import FacePhoto, Faces

    kontext, _, _ = pack
    g = np.random.default_rng(0)
    person = [
        Faces(
            (
                FacePhoto(0, (0, 0, 1, 1), g.normal(size=512).astype(np.float32), None),
                FacePhoto(1, (0, 0, 1, 1), g.normal(size=512).astype(np.float32), None),
            )
        )
        for _ in range(2)
    ]
    ids = kontext.WithAnyoneArcFaceIdentities.execute(person[0], person[1]).result[0]
    assert ids.siglip is None and ids.arcface.shape == (2, 512) and ids.photos_per_person == (2, 2)
    expected = (person[1].photos[0].embedding + person[1].photos[1].embedding) / 2
    assert torch.allclose(ids.arcface[1], torch.from_numpy(expected))
    with pytest.raises(ValueError, match="connect person_1 first"):
        kontext.WithAnyoneArcFaceIdentities.execute(None, person[1])


@pytest.fixture(scope="module")
def kontext_models(pack):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    from withanyone_core.adapter import AdapterConfig, ArcFaceOnlyAdapter
    from withanyone_core.testing.comfy_models import flux_state

    model = comfy.sd.load_diffusion_model_state_dict(dict(flux_state()), model_options={"dtype": torch.float32})
    torch.manual_seed(0)
    adapter = ArcFaceOnlyAdapter(AdapterConfig(3072, 24, 1, 1, variant="ke")).eval()
    with torch.no_grad():
        for block in adapter.ipa:
            block.to_out.weight.mul_(4.0)
    patcher = comfy.model_patcher.ModelPatcher(
        adapter,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return model, patcher


def _conditioning(reference):
    g = torch.Generator().manual_seed(5)
    extra = {"pooled_output": torch.randn(1, 768, generator=g)}
    context = torch.randn(1, 7, 768, generator=g)
    if reference is not None:  # what ReferenceLatent adds
        extra["reference_latents"] = [reference]
    return [[context, extra]]


def _sample(sampling, model, adapter, identities, layout, reference, mode="share", share=0.0, id_weight=1.0):
    cond = _conditioning(reference)
    return sampling.WithAnyoneSampler.execute(
        model,
        cond,
        cond,
        adapter,
        identities,
        layout,
        3,
        2,
        1.0,
        "euler",
        "withanyone (authors)",
        4.0,
        2,
        share,
        mode,
        id_weight,
        0.0,
    ).result[0]["samples"]


def test_ke_samples_with_a_reference_and_refuses_without(pack, kontext_models):
    from withanyone_pack.nodes.types import Identities, Layout

    _, sampling, _ = pack
    model, adapter = kontext_models
    identities = Identities(20 * torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), None, (1, 1))
    layout = Layout(W, H, ((4.0, 4.0, 40.7, 44.9), (50.0, 10.0, 90.0, 60.0)))
    reference = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(2))  # another size than the target
    with pytest.raises(ValueError, match="no reference image reached the model"):
        _sample(sampling, model, adapter, identities, layout, None)
    edited = _sample(sampling, model, adapter, identities, layout, reference)
    assert edited.shape == (2, 16, H // 8, W // 8) and torch.isfinite(edited).all()
    without_ids = _sample(sampling, model, adapter, identities, layout, reference, mode="independent", id_weight=0.0)
    assert (edited - without_ids).abs().max() > 1e-3  # the identities changed the edit
    with pytest.raises(ValueError, match="only the ArcFace branch"):
        _sample(sampling, model, adapter, identities, layout, reference, share=0.5)
