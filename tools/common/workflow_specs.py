"""The example workflows' specs: each a function of a server's ``/object_info`` returning a UI-format workflow.

The JSON files in ``example_workflows/`` are generated from these (``python -m dev.build_workflows``) so that
every widget value sits where the frontend expects it. Each file gets, on top of its spec: ``properties.models``
(name, url, directory) on every node that names a public model file (the frontend's missing-models dialog reads
them), a Markdown note saying which file goes where, and a ``.jpg`` thumbnail of the same stem (the picture the
template card shows). ComfyUI 0.3.75 and its frontends (1.32.9 .. 1.58.1) title a custom node's template card with
the file name, so the file names are the titles. The tests rebuild everything against a real server and fail if
a file differs, so edit here and rerun the generator. ``tools.bench_run`` rebuilds a spec against the server it
drives when a shipped file is older than the nodes.
"""

from __future__ import annotations

import json

from withanyone_core import recipe  # the authors' recipe: steps, guidance, size, share

from .get_comfyui import ROOT
from .workflows import Graph, render_thumbnail

WORKFLOWS_DIR = ROOT / "example_workflows"

# the model files the workflows name (README, "Model files"); users pick their own in the loaders
FLUX_FILE = "flux1-dev.safetensors"
CLIP_L_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"
VAE_FILE = "ae.safetensors"
ADAPTER_FILE = "withanyone.safetensors"
# one file (google's model.safetensors under this name), so the missing-models dialog can fetch it; the loader
# also takes the repository's folder
SIGLIP_NAME = "siglip-base-patch16-256-i18n.safetensors"
LORA_FILE = "your_flux_lora.safetensors"
PERSON_PHOTOS = [f"withanyone_person_{k}.png" for k in range(1, 5)]
LAYOUT_PHOTO = "withanyone_layout_photo.png"
GROUND_TRUTH_PHOTO = "withanyone_ground_truth.png"
GROUP_PHOTO = "withanyone_group_photo.png"  # the photo the edit workflow changes the faces of
SMALL_FACES_PHOTO = "withanyone_small_faces.png"  # an image (e.g. generated) whose faces are small
SAVED_PEOPLE = ["person_1.safetensors", "person_2.safetensors"]  # in models/withanyone/identities/

_HF = "https://huggingface.co"
# file name -> (download URL, ComfyUI model folder): public files the workflows name
MODEL_SOURCES = {
    FLUX_FILE: (f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors", "diffusion_models"),
    VAE_FILE: (f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors", "vae"),
    CLIP_L_FILE: (f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "text_encoders"),
    T5_FILE: (f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors", "text_encoders"),
    ADAPTER_FILE: (f"{_HF}/WithAnyone/WithAnyone/resolve/main/withanyone.safetensors", "withanyone"),
    SIGLIP_NAME: (f"{_HF}/google/siglip-base-patch16-256-i18n/resolve/main/model.safetensors", "siglip"),
    "flux1-kontext-dev.safetensors": (
        f"{_HF}/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors",
        "diffusion_models",
    ),
}
MODEL_NOTES = {  # what the note adds after a file's row
    FLUX_FILE: "gated: accept the licence on its Hugging Face page first",
    "flux1-kontext-dev.safetensors": "gated: accept the licence on its Hugging Face page first",
    SIGLIP_NAME: "google's model.safetensors, saved under this name (or the whole repository as a folder "
    "models/siglip/siglip-base-patch16-256-i18n/)",
}

COL = 360  # column width of the node grid


def _models(g: Graph, prompt: str, x: float = 0):
    """FLUX.1-dev, its text encoders and VAE, the prompt, and the three WithAnyone loaders."""
    unet = g.add("UNETLoader", (x, 0), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("DualCLIPLoader", (x, 130), clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux")
    vae = g.add("VAELoader", (x, 290), vae_name=VAE_FILE)
    positive = g.add("CLIPTextEncode", (x + COL, 0), title="Prompt", text=prompt, clip=clip.out())
    negative = g.add("CLIPTextEncode", (x + COL, 230), title="Negative (unused at cfg 1)", text="", clip=clip.out())
    adapter = g.add("WithAnyoneAdapterLoader", (x, 420), adapter_name=ADAPTER_FILE)
    analyzer = g.add(
        "WithAnyoneFaceAnalyzerLoader", (x, 530), provider="auto", detection_threshold=0.4, detection_size=640
    )
    siglip = g.add("WithAnyoneSiglipLoader", (x, 700), siglip_name=SIGLIP_NAME)
    g.group("FLUX.1-dev and WithAnyone models", [unet, clip, vae, adapter, analyzer, siglip], color="#444")
    return unet, positive, negative, vae, adapter, analyzer, siglip


def _person_faces(g: Graph, count: int, analyzer, x: float, y: float, photo_title: str, preview: bool):
    """Per person one Load Image + Face Extract (and a crop preview when ``preview``): the FACES inputs
    ``person_1..person_count`` of an identity node, and the nodes to group."""
    faces, nodes = {}, []
    for k in range(count):
        photo = g.add("LoadImage", (x, y + 380 * k), title=photo_title.format(k + 1), image=PERSON_PHOTOS[k])
        extract = g.add(
            "WithAnyoneFaceExtract",
            (x + COL, y + 380 * k),
            title=f"Person {k + 1}: face",
            image=photo.out("IMAGE"),
            face_analyzer=analyzer.out(),
            face_index=0,
            min_face_size=64,
            face_choice="highest score",
        )
        if preview:
            g.add(
                "PreviewImage", (x + 2 * COL, y + 380 * k), title=f"Person {k + 1}: crop", images=extract.out("preview")
            )
        faces[f"person_{k + 1}"] = extract.out("faces")
        nodes += [photo, extract]
    return faces, nodes


def _people(g: Graph, count: int, analyzer, siglip, x: float, y: float = 880):
    """One Load Image + Face Extract per person, then Identity Encode (person k -> layout box k)."""
    faces, nodes = _person_faces(g, count, analyzer, x, y, "Person {}: photo(s) of one person", preview=True)
    identities = g.add("WithAnyoneIdentityEncode", (x + 3 * COL, y), siglip=siglip.out(), **faces)
    g.group(f"{count} {'person' if count == 1 else 'people'}, in layout order", nodes, color="#3f789e")
    return identities


def _decode_and_save(g: Graph, latent, vae, x: float, prefix: str):
    image = g.add("VAEDecode", (x, 0), samples=latent, vae=vae.out())
    g.add("SaveImage", (x + COL, 0), images=image.out(), filename_prefix=prefix)
    return image


AUTHORS_SCHEDULE = "withanyone (authors)"


def _sampler(g: Graph, unet, positive, negative, adapter, identities, layout, seed: int, batch_size: int = 1):
    """The all-in-one WithAnyone Apply + Sample node with the authors' recipe (their schedule, 25 Euler steps, guidance 4,
    cfg 1, SigLIP share 0)."""
    return g.add(
        "WithAnyoneSampler",
        (2 * COL, 0),
        model=unet.out(),
        positive=positive.out(),
        negative=negative.out(),
        adapter=adapter.out(),
        identities=identities.out(),
        layout=layout.out("layout"),
        seed=seed,
        steps=recipe.DEFAULT_STEPS,
        cfg=1.0,
        sampler_name="euler",
        schedule=AUTHORS_SCHEDULE,
        guidance=recipe.DEFAULT_GUIDANCE,
        batch_size=batch_size,
        siglip_share=recipe.DEFAULT_SIGLIP_SHARE,
        weight_mode="share",
        id_weight=1.0,
        siglip_weight=0.0,
    )


def single_person(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a portrait photo of a person laughing on a sunny beach, wind in the hair, 35mm film"
    )
    identities = _people(g, 1, analyzer, siglip, x=0)
    layout = g.add(
        "WithAnyoneLayout",
        (3 * COL, 300),
        width=recipe.DEFAULT_SIZE,
        height=recipe.DEFAULT_SIZE,
        source="preset",
        people=1,
        boxes="0.38,0.18,0.62,0.50",
    )
    g.add("PreviewImage", (4 * COL, 300), title="Where the face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=42)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/single")
    return g.to_ui("One person. Put a photo of the person in the Load Image node; the preset places the face.")


def _apply_and_custom_sampler(
    g: Graph, unet, positive, adapter, identities, layout, width, height, x, lora: bool = False, seed: int = 7
):
    """Apply WithAnyone + ComfyUI's SamplerCustomAdvanced with the WithAnyone Schedule (the authors' sigmas for the
    layout's size), Euler, FLUX guidance 4 and no CFG: the authors' recipe with stock sampling nodes."""
    patched = g.add(
        "WithAnyoneApply",
        (x, 0),
        model=unet.out(),
        adapter=adapter.out(),
        identities=identities.out(),
        layout=layout.out("layout"),
        siglip_share=recipe.DEFAULT_SIGLIP_SHARE,
        weight_mode="share",
        id_weight=1.0,
        siglip_weight=0.0,
        start_percent=0.0,
        end_percent=1.0,
    )
    model = patched
    if lora:
        model = g.add(
            "LoraLoaderModelOnly",
            (x, 260),
            title="Your FLUX LoRA (after Apply WithAnyone)",
            model=patched.out(),
            lora_name=LORA_FILE,
            strength_model=0.8,
        )
    guided = g.add("FluxGuidance", (x, 400), conditioning=positive.out(), guidance=recipe.DEFAULT_GUIDANCE)
    guider = g.add("BasicGuider", (x, 520), model=model.out(), conditioning=guided.out())
    noise = g.add("RandomNoise", (x, 620), noise_seed=seed)
    sampler = g.add("KSamplerSelect", (x, 740), sampler_name="euler")
    sigmas = g.add(
        "WithAnyoneSchedule",
        (x, 840),
        steps=recipe.DEFAULT_STEPS,
        width=width,
        height=height,
        layout=layout.out("layout"),
    )
    empty = g.add("EmptySD3LatentImage", (x, 1000), width=width, height=height, batch_size=1)
    return g.add(
        "SamplerCustomAdvanced",
        (x + COL, 0),
        noise=noise.out(),
        guider=guider.out(),
        sampler=sampler.out(),
        sigmas=sigmas.out(),
        latent_image=empty.out(),
    )


def two_people_layout_from_photo(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "two friends sharing a pizza in a small Naples restaurant, warm evening light, candid photo"
    )
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout_photo = g.add(
        "LoadImage", (4 * COL, 880), title="Layout: a photo with two people placed as wanted", image=LAYOUT_PHOTO
    )
    layout = g.add(
        "WithAnyoneLayout",
        (5 * COL, 880),
        width=1024,
        height=768,
        source="image",
        people=2,
        boxes="",
        layout_image=layout_photo.out("IMAGE"),
        face_analyzer=analyzer.out(),
    )
    g.add(
        "PreviewImage",
        (6 * COL, 880),
        title="Face boxes found (left to right = person 1, 2)",
        images=layout.out("preview"),
    )
    sampled = _apply_and_custom_sampler(g, unet, positive, adapter, identities, layout, 1024, 768, 2 * COL)
    _decode_and_save(g, sampled.out("output"), vae, 4 * COL, "WithAnyone/two_people")
    return g.to_ui(
        "Two people; the face boxes come from an example photo (its faces, left to right). "
        "Apply WithAnyone patches the model; ComfyUI's SamplerCustomAdvanced samples it with the "
        "authors' schedule (WithAnyone Schedule)."
    )


FOUR_BOXES = "72,190,256,374\n304,144,476,316\n548,144,720,316\n768,190,952,374"


def four_people_manual_layout(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "four colleagues posing for a team photo in a bright office, natural expressions, sharp focus"
    )
    identities = _people(g, 4, analyzer, siglip, x=0)
    layout = g.add(
        "WithAnyoneLayout",
        (4 * COL, 880),
        title="Four face boxes (pixels, one per line)",
        width=1024,
        height=768,
        source="text",
        people=4,
        boxes=FOUR_BOXES,
    )
    g.add("PreviewImage", (5 * COL, 880), title="Where each face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=1234)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/four_people")
    return g.to_ui("Four people with a hand-written layout: box k is person k. Edit the numbers to move faces.")


def with_lora(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "two people in a watercolor illustration, walking through a market, soft colors"
    )
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout = g.add(
        "WithAnyoneLayout",
        (4 * COL, 880),
        width=recipe.DEFAULT_SIZE,
        height=recipe.DEFAULT_SIZE,
        source="preset",
        people=2,
        boxes="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
    )
    g.add("PreviewImage", (5 * COL, 880), images=layout.out("preview"))
    sampled = _apply_and_custom_sampler(
        g, unet, positive, adapter, identities, layout, recipe.DEFAULT_SIZE, recipe.DEFAULT_SIZE, 2 * COL, lora=True
    )
    _decode_and_save(g, sampled.out("output"), vae, 4 * COL, "WithAnyone/lora")
    return g.to_ui(
        "A FLUX LoRA on top of WithAnyone: the LoRA loader goes after Apply WithAnyone (either order "
        "works). Pick your LoRA in the loader."
    )


def identity_metrics(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a person reading a book in a cafe, side light, looking out of the window"
    )
    identities = _people(g, 1, analyzer, siglip, x=0)
    layout = g.add(
        "WithAnyoneLayout",
        (3 * COL, 300),
        width=recipe.DEFAULT_SIZE,
        height=recipe.DEFAULT_SIZE,
        source="preset",
        people=1,
        boxes="0.38,0.18,0.62,0.50",
    )
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=3, batch_size=2)
    image = _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/metrics")
    truth = g.add(
        "LoadImage", (4 * COL, 880), title="Ground truth: another photo of the same person", image=GROUND_TRUTH_PHOTO
    )
    g.add(
        "WithAnyoneIdentityMetrics",
        (5 * COL, 300),
        image=image.out(),
        face_analyzer=analyzer.out(),
        identities=identities.out(),
        ground_truth=truth.out("IMAGE"),
    )
    return g.to_ui(
        "Copy-paste meter: Sim(Ref), Sim(GT) and CP of each generated face. CP near +1 means a copy of "
        "the reference photo; near -1, the person as in the ground-truth photo."
    )


def _faces_inpaint(
    g: Graph,
    unet,
    positive,
    vae,
    adapter,
    identities,
    photo,
    layout,
    x: float,
    y: float,
    denoise: float,
    grow: int,
    seed: int,
):
    """Masked latent inpainting of the layout's face boxes with the identities: VAE Encode + Set Latent Noise Mask
    (the boxes, grown), Apply WithAnyone, SamplerCustomAdvanced on the last ``denoise`` share of the authors'
    schedule, then the result pasted into the photo through a softened mask, so pixels away from the faces stay
    the photo's own."""
    grown = g.add(
        "GrowMask", (x, y), title="Face boxes, grown", mask=layout.out("mask"), expand=grow, tapered_corners=True
    )
    encoded = g.add("VAEEncode", (x, y + 130), pixels=photo.out(), vae=vae.out())
    masked = g.add("SetLatentNoiseMask", (x, y + 230), samples=encoded.out(), mask=grown.out())
    patched = g.add(
        "WithAnyoneApply",
        (x + COL, y),
        model=unet.out(),
        adapter=adapter.out(),
        identities=identities.out(),
        layout=layout.out("layout"),
        siglip_share=recipe.DEFAULT_SIGLIP_SHARE,
        weight_mode="share",
        id_weight=1.0,
        siglip_weight=0.0,
        start_percent=0.0,
        end_percent=1.0,
    )
    guided = g.add("FluxGuidance", (x + COL, y + 400), conditioning=positive.out(), guidance=recipe.DEFAULT_GUIDANCE)
    guider = g.add("BasicGuider", (x + COL, y + 520), model=patched.out(), conditioning=guided.out())
    noise = g.add("RandomNoise", (x + COL, y + 620), noise_seed=seed)
    sampler = g.add("KSamplerSelect", (x + COL, y + 740), sampler_name="euler")
    schedule = g.add(
        "WithAnyoneSchedule",
        (x + 2 * COL, y),
        steps=recipe.DEFAULT_STEPS,
        width=recipe.DEFAULT_SIZE,
        height=recipe.DEFAULT_SIZE,
        layout=layout.out("layout"),
    )
    split = g.add(
        "SplitSigmasDenoise",
        (x + 2 * COL, y + 160),
        title="Denoise: how much of each face is redrawn",
        sigmas=schedule.out(),
        denoise=denoise,
    )
    sampled = g.add(
        "SamplerCustomAdvanced",
        (x + 2 * COL, y + 300),
        noise=noise.out(),
        guider=guider.out(),
        sampler=sampler.out(),
        sigmas=split.out("low_sigmas"),
        latent_image=masked.out(),
    )
    decoded = g.add("VAEDecode", (x + 3 * COL, y), samples=sampled.out("output"), vae=vae.out())
    as_image = g.add("MaskToImage", (x + 3 * COL, y + 130), mask=grown.out())
    blurred = g.add("ImageBlur", (x + 3 * COL, y + 230), image=as_image.out(), blur_radius=15, sigma=5.0)
    soft = g.add(
        "ImageToMask", (x + 3 * COL, y + 370), title="Soft edge for pasting", image=blurred.out(), channel="red"
    )
    pasted = g.add(
        "ImageCompositeMasked",
        (x + 4 * COL, y),
        title="New faces pasted into the photo",
        destination=photo.out(),
        source=decoded.out(),
        x=0,
        y=0,
        resize_source=False,
        mask=soft.out(),
    )
    g.group(
        "Redraw the faces with the identities (masked inpainting)",
        [
            grown,
            encoded,
            masked,
            patched,
            guided,
            guider,
            noise,
            sampler,
            schedule,
            split,
            sampled,
            decoded,
            as_image,
            blurred,
            soft,
            pasted,
        ],
        color="#8a5a2b",
    )
    return pasted


def _faces_of_image(g: Graph, image, analyzer, noun: str, preview_title: str):
    """The two faces of ``image`` as the layout (left to right = person 1, 2) at the image's own size, and their
    preview. Framing 'fill' at the image's own size maps every face box onto itself: the boxes are where the
    faces are."""
    size = g.add("GetImageSize", (4 * COL, 1380), image=image.out())
    layout = g.add(
        "WithAnyoneLayout",
        (5 * COL, 880),
        title=f"Faces of the {noun} (left to right = person 1, 2)",
        width=size.out("width"),
        height=size.out("height"),
        source="image",
        people=2,
        boxes="",
        layout_image=image.out(),
        face_analyzer=analyzer.out(),
        image_framing="fill",
    )
    g.add("PreviewImage", (6 * COL, 880), title=preview_title, images=layout.out("preview"))
    return layout


def edit_group_photo(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a group photo of two friends, natural light, sharp focus, detailed faces"
    )
    identities = _people(g, 2, analyzer, siglip, x=0)
    photo = g.add("LoadImage", (4 * COL, 880), title="The group photo to edit", image=GROUP_PHOTO)
    scaled = g.add(
        "ImageScaleToMaxDimension",
        (4 * COL, 1240),
        title="Photo at FLUX size (longest side)",
        image=photo.out("IMAGE"),
        upscale_method="lanczos",
        largest_size=1024,
    )
    layout = _faces_of_image(g, scaled, analyzer, "photo", "Faces that will be replaced")
    pasted = _faces_inpaint(
        g, unet, positive, vae, adapter, identities, scaled, layout, 2 * COL, 1700, denoise=0.85, grow=24, seed=11
    )
    g.add("SaveImage", (6 * COL + 40, 1700), images=pasted.out(), filename_prefix="WithAnyone/edited")
    return g.to_ui(
        "Replaces the faces of a group photo with the given people: the layout comes from the photo's "
        "faces (left to right = person 1, 2), only the face boxes are redrawn (masked latent "
        "inpainting, denoise 0.85 of the authors' schedule) and pasted back; the rest stays the photo."
    )


def refine_small_faces(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a photo of a group of friends, detailed faces, sharp focus"
    )
    identities = _people(g, 2, analyzer, siglip, x=0)
    image = g.add(
        "LoadImage",
        (4 * COL, 880),
        title="An image whose faces are small (e.g. a generated one)",
        image=SMALL_FACES_PHOTO,
    )
    larger = g.add(
        "ImageScaleBy",
        (4 * COL, 1240),
        title="2x: four times the tokens per face",
        image=image.out("IMAGE"),
        upscale_method="lanczos",
        scale_by=2.0,
    )
    layout = _faces_of_image(g, larger, analyzer, "image", "Faces that will be refined")
    pasted = _faces_inpaint(
        g, unet, positive, vae, adapter, identities, larger, layout, 2 * COL, 1700, denoise=0.45, grow=16, seed=5
    )
    back = g.add(
        "ImageScaleBy",
        (6 * COL + 40, 1700),
        title="Back to the original size",
        image=pasted.out(),
        upscale_method="lanczos",
        scale_by=0.5,
    )
    g.add("SaveImage", (6 * COL + 40, 1840), images=back.out(), filename_prefix="WithAnyone/refined")
    return g.to_ui(
        "A second pass for small faces: the image at twice its size, its faces (left to right = person "
        "1, 2) redrawn with the identities at denoise 0.45 of the authors' schedule, pasted back and "
        "scaled down again. Run it on an image from another WithAnyone workflow."
    )


SAVE_PEOPLE = "WithAnyone - save people"


def save_people(info: dict) -> dict:
    """The companion of 'saved people': saves the two people it loads, from one photo each."""
    g = Graph(info)
    analyzer = g.add(
        "WithAnyoneFaceAnalyzerLoader", (0, 0), provider="auto", detection_threshold=0.4, detection_size=640
    )
    siglip = g.add("WithAnyoneSiglipLoader", (0, 170), siglip_name=SIGLIP_NAME)
    g.group("Face analyzer and SigLIP (needed to save, not to load)", [analyzer, siglip], color="#444")
    nodes = []
    for k, file in enumerate(SAVED_PEOPLE):
        name = file.removesuffix(".safetensors")
        photo = g.add(
            "LoadImage", (COL, 380 * k), title=f"Person {k + 1}: photo(s) of one person", image=PERSON_PHOTOS[k]
        )
        extract = g.add(
            "WithAnyoneFaceExtract",
            (2 * COL, 380 * k),
            title=f"Person {k + 1}: face",
            image=photo.out("IMAGE"),
            face_analyzer=analyzer.out(),
            face_index=0,
            min_face_size=64,
            face_choice="highest score",
        )
        save = g.add(
            "WithAnyoneSaveIdentity",
            (3 * COL, 380 * k),
            title=f"Person {k + 1}: save as {name}",
            faces=extract.out("faces"),
            siglip=siglip.out(),
            name=name,
            overwrite=False,
        )
        nodes += [photo, extract, save]
    g.group(f"{len(SAVED_PEOPLE)} people, saved in models/withanyone/identities/", nodes, color="#3f789e")
    return g.to_ui(
        f"Saves two people as {' and '.join(SAVED_PEOPLE)} in models/withanyone/identities/: put a "
        "photo of each in the Load Image nodes and run it once. Then press R (refresh) and open "
        "'WithAnyone - saved people', which uses them without the face analyzer or SigLIP."
    )


def saved_people(info: dict) -> dict:
    g = Graph(info)
    unet = g.add("UNETLoader", (0, 0), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("DualCLIPLoader", (0, 130), clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux")
    vae = g.add("VAELoader", (0, 290), vae_name=VAE_FILE)
    positive = g.add(
        "CLIPTextEncode",
        (COL, 0),
        title="Prompt",
        clip=clip.out(),
        text="two friends hiking on a mountain ridge at sunrise, backpacks, wide shot",
    )
    negative = g.add("CLIPTextEncode", (COL, 230), title="Negative (unused at cfg 1)", text="", clip=clip.out())
    adapter = g.add("WithAnyoneAdapterLoader", (0, 420), adapter_name=ADAPTER_FILE)
    g.group(
        "FLUX.1-dev and the WithAnyone adapter (no face analyzer, no SigLIP)", [unet, clip, vae, adapter], color="#444"
    )
    people = [
        g.add("WithAnyoneLoadIdentity", (0, 880 + 200 * k), title=f"Person {k + 1}: saved identity", identity_name=name)
        for k, name in enumerate(SAVED_PEOPLE)
    ]
    identities = g.add(
        "WithAnyoneIdentityEncode", (COL, 880), person_1=people[0].out("person"), person_2=people[1].out("person")
    )
    g.group("2 saved people, in layout order", people, color="#3f789e")
    layout = g.add(
        "WithAnyoneLayout",
        (2 * COL, 880),
        width=recipe.DEFAULT_SIZE,
        height=recipe.DEFAULT_SIZE,
        source="preset",
        people=2,
        boxes="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
    )
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=21)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/saved_people")
    return g.to_ui(
        f"Two people saved earlier: run '{SAVE_PEOPLE}' once first (it saves {' and '.join(SAVED_PEOPLE)}"
        "), or put Save WithAnyone Identity between Face Extract and Identity Encode in any workflow. "
        "No face analyzer or SigLIP needed. Saved and new people mix in Identity Encode, in person order."
    )


# file stem (= the template card's title) -> spec
BUILDERS = {
    "WithAnyone - one person": single_person,
    "WithAnyone - two people, layout from a photo": two_people_layout_from_photo,
    "WithAnyone - four people, typed boxes": four_people_manual_layout,
    "WithAnyone - with a FLUX LoRA": with_lora,
    "WithAnyone - copy-paste meter": identity_metrics,
    "WithAnyone - edit a group photo": edit_group_photo,
    "WithAnyone - refine small faces": refine_small_faces,
    SAVE_PEOPLE: save_people,
    "WithAnyone - saved people": saved_people,
}
SINGLE_PERSON = "WithAnyone - one person"
FOUR_PEOPLE = "WithAnyone - four people, typed boxes"
# files that validating the workflows needs (names are checked, not contents): models/ and input/ relative
PLACEHOLDER_MODELS = [
    f"diffusion_models/{FLUX_FILE}",
    f"text_encoders/{CLIP_L_FILE}",
    f"text_encoders/{T5_FILE}",
    f"vae/{VAE_FILE}",
    f"withanyone/{ADAPTER_FILE}",
    f"loras/{LORA_FILE}",
    f"siglip/{SIGLIP_NAME}",
    *(f"withanyone/identities/{name}" for name in SAVED_PEOPLE),
]
PLACEHOLDER_INPUTS = [*PERSON_PHOTOS, LAYOUT_PHOTO, GROUND_TRUTH_PHOTO, GROUP_PHOTO, SMALL_FACES_PHOTO]

# ------------------------------------------------------------------ FLUX.1 Kontext: WithAnyone.K and .Ke
KONTEXT_FLUX_FILE = "flux1-kontext-dev.safetensors"
K_ADAPTER_FILE = "withanyone_k.safetensors"  # WithAnyone.K.preview (two-branch keys, like the base adapter)
KE_ADAPTER_FILE = "withanyone_ke.safetensors"  # WithAnyone.Ke.preview (ipa.*, arcface_in.*)
EDIT_SOURCE_PHOTO = "withanyone_edit_source.png"

KONTEXT_PLACEHOLDER_MODELS = [
    f"diffusion_models/{KONTEXT_FLUX_FILE}",
    f"withanyone/{K_ADAPTER_FILE}",
    f"withanyone/{KE_ADAPTER_FILE}",
    f"text_encoders/{CLIP_L_FILE}",
    f"text_encoders/{T5_FILE}",
    f"vae/{VAE_FILE}",
    f"siglip/{SIGLIP_NAME}/config.json",
]
KONTEXT_PLACEHOLDER_INPUTS = [EDIT_SOURCE_PHOTO, *PERSON_PHOTOS[:2]]


def _kontext_models(g: Graph, prompt: str, adapter_file: str, siglip: bool):
    unet = g.add(
        "UNETLoader", (0, 0), title="FLUX.1 Kontext [dev]", unet_name=KONTEXT_FLUX_FILE, weight_dtype="default"
    )
    clip = g.add("DualCLIPLoader", (0, 130), clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux")
    vae = g.add("VAELoader", (0, 290), vae_name=VAE_FILE)
    positive = g.add("CLIPTextEncode", (COL, 0), title="Prompt", text=prompt, clip=clip.out())
    negative = g.add("CLIPTextEncode", (COL, 230), title="Negative (unused at cfg 1)", text="", clip=clip.out())
    adapter = g.add("WithAnyoneAdapterLoader", (0, 420), adapter_name=adapter_file)
    analyzer = g.add(
        "WithAnyoneFaceAnalyzerLoader", (0, 530), provider="auto", detection_threshold=0.4, detection_size=640
    )
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
        g, "two friends laughing at a street food stall at night, neon signs, candid photo", K_ADAPTER_FILE, True
    )
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout = g.add(
        "WithAnyoneLayout",
        (4 * COL, 880),
        width=768,
        height=768,
        source="preset",
        people=2,
        boxes="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52",
    )
    g.add("PreviewImage", (5 * COL, 880), title="Where each face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=21)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/kontext_k")
    return g.to_ui(
        "WithAnyone.K (preview): text-to-image with given people on FLUX.1 Kontext [dev], no reference "
        "image. The authors call it less stable than the base model on FLUX.1-dev."
    )


def _arcface_people(g: Graph, count: int, analyzer, x: float, y: float = 880):
    faces, nodes = _person_faces(g, count, analyzer, x, y, "Person {0}: who goes into face {0}", preview=False)
    identities = g.add("WithAnyoneArcFaceIdentities", (x + 2 * COL, y), **faces)
    g.group(f"{count} people, in the order of the numbered faces", nodes, color="#3f789e")
    return identities


def ke_face_edit(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, _ = _kontext_models(g, "", KE_ADAPTER_FILE, False)
    source = g.add(
        "LoadImage", (4 * COL, 0), title="Source photo (near-square): its faces are replaced", image=EDIT_SOURCE_PHOTO
    )
    prepare = g.add(
        "WithAnyoneFaceEditPrepare",
        (5 * COL, 0),
        image=source.out("IMAGE"),
        face_analyzer=analyzer.out(),
        face_order="detection score",
        aspect_limit="authors (0.9-1.1)",
        megapixels=0.0,
        box_mapping="authors",
        min_blur_face=100,
        blur_radius=15.0,
    )
    g.add("PreviewImage", (6 * COL, 0), title="Faces found: face k gets person k", images=prepare.out("preview"))
    g.add("PreviewImage", (6 * COL, 330), title="Kontext reference (faces blurred)", images=prepare.out("reference"))
    encoded = g.add("VAEEncode", (5 * COL, 420), pixels=prepare.out("reference"), vae=vae.out())
    referenced = g.add("ReferenceLatent", (5 * COL, 540), conditioning=positive.out(), latent=encoded.out())
    identities = _arcface_people(g, 2, analyzer, x=0)
    latent = _sampler(g, unet, referenced, negative, adapter, identities, prepare, seed=42)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/kontext_edit")
    return g.to_ui(
        "WithAnyone.Ke (preview) face editing on FLUX.1 Kontext [dev], the authors' recipe: the source "
        "photo's faces (up to 4) are blurred into the Kontext reference and replaced by the given people "
        "(person k into face k, see the preview). Connect as many people as faces were found. The prompt "
        "is empty as in the authors' example; write one to change the scene too."
    )


def kontext_builders() -> dict:
    """The Kontext specs by file stem (BUILDERS holds them under their card titles)."""
    return {"withanyone_kontext_k_text_to_image": k_text_to_image, "withanyone_kontext_ke_face_edit": ke_face_edit}


# Kontext specs (below), under card titles like the others
KONTEXT_TITLES = {
    "withanyone_kontext_k_text_to_image": "WithAnyone Kontext - people in a new picture (K)",
    "withanyone_kontext_ke_face_edit": "WithAnyone Kontext - edit faces (Ke)",
}


BUILDERS.update({KONTEXT_TITLES.get(name, name): build for name, build in kontext_builders().items()})
PLACEHOLDER_MODELS += [
    m
    for m in KONTEXT_PLACEHOLDER_MODELS
    if m not in PLACEHOLDER_MODELS and not any(m.startswith(f + "/") for f in PLACEHOLDER_MODELS)
]
PLACEHOLDER_INPUTS += [i for i in KONTEXT_PLACEHOLDER_INPUTS if i not in PLACEHOLDER_INPUTS]


def _string_widgets(node: dict) -> list[str]:
    return [v for v in node.get("widgets_values") or [] if isinstance(v, str)]


def attach_model_sources(workflow: dict) -> None:
    """``properties.models`` on every node whose widgets name a public model file (the frontend's missing-models
    dialog lists each entry whose name is a current widget value, with its download and folder)."""
    for node in workflow["nodes"]:
        models = [
            {"name": v, "url": MODEL_SOURCES[v][0], "directory": MODEL_SOURCES[v][1]}
            for v in _string_widgets(node)
            if v in MODEL_SOURCES
        ]
        if models:
            node["properties"]["models"] = models


def note_text(name: str, workflow: dict) -> str:
    """The note's Markdown: what the workflow does and which file goes where."""
    rows, seen = [], set()
    types = {n["type"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        for entry in node["properties"].get("models", []):
            if entry["name"] in seen:
                continue
            seen.add(entry["name"])
            extra = MODEL_NOTES.get(entry["name"])
            rows.append(
                f"| {entry['name']} | models/{entry['directory']}/ | [download]({entry['url']})"
                + (f" ({extra})" if extra else "")
                + " |"
            )
        if node["type"] == "WithAnyoneAdapterLoader":
            value = _string_widgets(node)[0]
            if value not in MODEL_SOURCES and value not in seen:
                seen.add(value)
                rows.append(
                    f"| {value} | models/withanyone/ | the WithAnyone release ({_HF}/WithAnyone/WithAnyone): "
                    "its Kontext preview file, under this name or picked in the loader |"
                )
    if "WithAnyoneFaceAnalyzerLoader" in types:
        rows.append(
            "| antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx, ...) | models/insightface/models/"
            "antelopev2/ | insightface's antelopev2.zip, unpacked (the layout InstantID and PuLID use) |"
        )
    if "WithAnyoneLoadIdentity" in types:
        rows.append(
            "| person_1.safetensors, ... | models/withanyone/identities/ | written by Save WithAnyone "
            f"Identity: run the workflow '{SAVE_PEOPLE}' first |"
        )
    if "LoraLoaderModelOnly" in types:
        rows.append("| your FLUX LoRA | models/loras/ | any FLUX.1 LoRA |")
    photos = [n.get("title") or "Load Image" for n in workflow["nodes"] if n["type"] == "LoadImage"]
    lines = [
        f"## {name}",
        "",
        workflow["extra"].get("withanyone_note", ""),
        "",
        "### Model files",
        "",
        "| file | put it in | from |",
        "|---|---|---|",
        *rows,
        "",
        "Missing files are listed with their downloads when the workflow opens. Press R after adding files.",
    ]
    if photos:
        lines += ["", "### Your photos (Load Image)", "", *(f"- {title}" for title in photos)]
    return "\n".join(lines)


def finish(name: str, workflow: dict) -> dict:
    """What every shipped workflow gets on top of its spec: model sources and the note."""
    attach_model_sources(workflow)
    left = min(n["pos"][0] for n in workflow["nodes"])
    top = min(n["pos"][1] for n in workflow["nodes"])
    note = {
        "id": workflow["last_node_id"] + 1,
        "type": "MarkdownNote",
        "pos": [left - 600.0, top - 30.0],
        "size": [560.0, 620.0],
        "flags": {},
        "order": len(workflow["nodes"]),
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "title": "Read me: what goes where",
        "properties": {},
        "widgets_values": [note_text(name, workflow)],
        "color": "#432",
        "bgcolor": "#653",
    }
    workflow["nodes"].append(note)
    workflow["last_node_id"] = note["id"]
    return workflow


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: finish(name, build(object_info)) for name, build in BUILDERS.items()}


def thumbnail(name: str, workflow: dict):
    """The template card's picture: the graph and the workflow's title and description."""
    return render_thumbnail(workflow, name, workflow["extra"].get("withanyone_note", ""))


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"
