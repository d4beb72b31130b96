"""Example workflow specs for FLUX.1 Kontext: WithAnyone.K (text-to-image) and WithAnyone.Ke (face editing).

Same format as tools/build_workflows.py (a function of the server's /object_info returning a
UI-format workflow); register them there with::

    from kontext_workflows import kontext_builders
    BUILDERS.update(kontext_builders())

and give the server the files in :data:`PLACEHOLDER_MODELS` / :data:`PLACEHOLDER_INPUTS` when
validating (names are checked, not contents).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_workflows import (  # noqa: E402
    CLIP_L_FILE, COL, PERSON_PHOTOS, SIGLIP_NAME, T5_FILE, VAE_FILE, _decode_and_save, _people, _sampler,
)
from workflows import Graph  # noqa: E402

KONTEXT_FLUX_FILE = "flux1-kontext-dev.safetensors"
K_ADAPTER_FILE = "withanyone_k.safetensors"  # WithAnyone.K.preview (two-branch keys, like the base adapter)
KE_ADAPTER_FILE = "withanyone_ke.safetensors"  # WithAnyone.Ke.preview (ipa.*, arcface_in.*)
EDIT_SOURCE_PHOTO = "withanyone_edit_source.png"

PLACEHOLDER_MODELS = [f"diffusion_models/{KONTEXT_FLUX_FILE}", f"withanyone/{K_ADAPTER_FILE}",
                      f"withanyone/{KE_ADAPTER_FILE}", f"text_encoders/{CLIP_L_FILE}", f"text_encoders/{T5_FILE}",
                      f"vae/{VAE_FILE}", f"siglip/{SIGLIP_NAME}/config.json"]
PLACEHOLDER_INPUTS = [EDIT_SOURCE_PHOTO, *PERSON_PHOTOS[:2]]


def _kontext_models(g: Graph, prompt: str, adapter_file: str, siglip: bool):
    unet = g.add("UNETLoader", (0, 0), title="FLUX.1 Kontext [dev]", unet_name=KONTEXT_FLUX_FILE,
                 weight_dtype="default")
    clip = g.add("DualCLIPLoader", (0, 130), clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux")
    vae = g.add("VAELoader", (0, 290), vae_name=VAE_FILE)
    positive = g.add("CLIPTextEncode", (COL, 0), title="Prompt", text=prompt, clip=clip.out())
    negative = g.add("CLIPTextEncode", (COL, 230), title="Negative (unused at cfg 1)", text="", clip=clip.out())
    adapter = g.add("WithAnyoneAdapterLoader", (0, 420), adapter_name=adapter_file)
    analyzer = g.add("WithAnyoneFaceAnalyzerLoader", (0, 530), provider="auto", detection_threshold=0.4,
                     detection_size=640)
    nodes = [unet, clip, vae, adapter, analyzer]
    encoder = None
    if siglip:
        encoder = g.add("WithAnyoneSiglipLoader", (0, 700), siglip_name=SIGLIP_NAME)
        nodes.append(encoder)
    g.group("FLUX.1 Kontext and WithAnyone models", nodes, color="#444")
    return unet, positive, negative, vae, adapter, analyzer, encoder


def k_text_to_image(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _kontext_models(
        g, "two friends laughing at a street food stall at night, neon signs, candid photo", K_ADAPTER_FILE, True)
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout = g.add("WithAnyoneLayout", (4 * COL, 880), width=768, height=768, source="preset", people=2,
                   boxes="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52")
    g.add("PreviewImage", (5 * COL, 880), title="Where each face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=21)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/kontext_k")
    return g.to_ui("WithAnyone.K (preview): text-to-image with given people on FLUX.1 Kontext [dev], no reference "
                   "image. The authors call it less stable than the base model on FLUX.1-dev.")


def _arcface_people(g: Graph, count: int, analyzer, x: float, y: float = 880):
    faces, nodes = {}, []
    for k in range(count):
        photo = g.add("LoadImage", (x, y + 380 * k), title=f"Person {k + 1}: who goes into face {k + 1}",
                      image=PERSON_PHOTOS[k])
        extract = g.add("WithAnyoneFaceExtract", (x + COL, y + 380 * k), title=f"Person {k + 1}: face",
                        image=photo.out("IMAGE"), face_analyzer=analyzer.out(), face_index=0, min_face_size=64,
                        face_choice="highest score")
        faces[f"person_{k + 1}"] = extract.out("faces")
        nodes += [photo, extract]
    identities = g.add("WithAnyoneArcFaceIdentities", (x + 2 * COL, y), **faces)
    g.group(f"{count} people, in the order of the numbered faces", nodes, color="#3f789e")
    return identities


def ke_face_edit(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, _ = _kontext_models(g, "", KE_ADAPTER_FILE, False)
    source = g.add("LoadImage", (4 * COL, 0), title="Source photo (near-square): its faces are replaced",
                   image=EDIT_SOURCE_PHOTO)
    prepare = g.add("WithAnyoneFaceEditPrepare", (5 * COL, 0), image=source.out("IMAGE"),
                    face_analyzer=analyzer.out(), face_order="detection score", aspect_limit="authors (0.9-1.1)",
                    megapixels=0.0, box_mapping="authors", min_blur_face=100, blur_radius=15.0)
    g.add("PreviewImage", (6 * COL, 0), title="Faces found: face k gets person k", images=prepare.out("preview"))
    g.add("PreviewImage", (6 * COL, 330), title="Kontext reference (faces blurred)", images=prepare.out("reference"))
    encoded = g.add("VAEEncode", (5 * COL, 420), pixels=prepare.out("reference"), vae=vae.out())
    referenced = g.add("ReferenceLatent", (5 * COL, 540), conditioning=positive.out(), latent=encoded.out())
    identities = _arcface_people(g, 2, analyzer, x=0)
    latent = _sampler(g, unet, referenced, negative, adapter, identities, prepare, seed=42)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/kontext_edit")
    return g.to_ui("WithAnyone.Ke (preview) face editing on FLUX.1 Kontext [dev], the authors' recipe: the source "
                   "photo's faces (up to 4) are blurred into the Kontext reference and replaced by the given people "
                   "(person k into face k, see the preview). Connect as many people as faces were found. The prompt "
                   "is empty as in the authors' example; write one to change the scene too.")


def kontext_builders() -> dict:
    """Workflow name -> spec function, for tools/build_workflows.py's BUILDERS."""
    return {"withanyone_kontext_k_text_to_image": k_text_to_image, "withanyone_kontext_ke_face_edit": ke_face_edit}
