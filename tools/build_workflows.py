"""Write the example workflows in ``example_workflows/`` from the specs below.

    python tools/build_workflows.py          # starts a ComfyUI with the pack for /object_info

The specs are the source; the JSON files are generated so that every widget value sits
where the frontend expects it. tests/test_workflows.py rebuilds them against a real
server and fails if a file differs, so edit here and rerun.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from get_comfyui import ROOT  # noqa: E402
from workflows import Graph  # noqa: E402

sys.path.insert(0, str(ROOT))
from withanyone_core import recipe  # noqa: E402  (the authors' recipe: steps, guidance, size, share)

WORKFLOWS_DIR = ROOT / "example_workflows"

# the model files the workflows name (README, "Model files"); users pick their own in the loaders
FLUX_FILE = "flux1-dev.safetensors"
CLIP_L_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"
VAE_FILE = "ae.safetensors"
ADAPTER_FILE = "withanyone.safetensors"
SIGLIP_NAME = "siglip-base-patch16-256-i18n"
LORA_FILE = "your_flux_lora.safetensors"
PERSON_PHOTOS = [f"withanyone_person_{k}.png" for k in range(1, 5)]
LAYOUT_PHOTO = "withanyone_layout_photo.png"
GROUND_TRUTH_PHOTO = "withanyone_ground_truth.png"

COL = 360  # column width of the node grid


def _models(g: Graph, prompt: str, x: float = 0):
    """FLUX.1-dev, its text encoders and VAE, the prompt, and the three WithAnyone loaders."""
    unet = g.add("UNETLoader", (x, 0), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("DualCLIPLoader", (x, 130), clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux")
    vae = g.add("VAELoader", (x, 290), vae_name=VAE_FILE)
    positive = g.add("CLIPTextEncode", (x + COL, 0), title="Prompt", text=prompt, clip=clip.out())
    negative = g.add("CLIPTextEncode", (x + COL, 230), title="Negative (unused at cfg 1)", text="",
                     clip=clip.out())
    adapter = g.add("WithAnyoneAdapterLoader", (x, 420), adapter_name=ADAPTER_FILE)
    analyzer = g.add("WithAnyoneFaceAnalyzerLoader", (x, 530), provider="auto", detection_threshold=0.4,
                     detection_size=640)
    siglip = g.add("WithAnyoneSiglipLoader", (x, 700), siglip_name=SIGLIP_NAME)
    g.group("FLUX.1-dev and WithAnyone models", [unet, clip, vae, adapter, analyzer, siglip], color="#444")
    return unet, positive, negative, vae, adapter, analyzer, siglip


def _people(g: Graph, count: int, analyzer, siglip, x: float, y: float = 880):
    """One Load Image + Face Extract per person, then Identity Encode (person k -> layout box k)."""
    faces, nodes = {}, []
    for k in range(count):
        photo = g.add("LoadImage", (x, y + 380 * k), title=f"Person {k + 1}: photo(s) of one person",
                      image=PERSON_PHOTOS[k])
        extract = g.add("WithAnyoneFaceExtract", (x + COL, y + 380 * k), title=f"Person {k + 1}: face",
                        image=photo.out("IMAGE"), face_analyzer=analyzer.out(), face_index=0, min_face_size=64,
                        face_choice="highest score")
        g.add("PreviewImage", (x + 2 * COL, y + 380 * k), title=f"Person {k + 1}: crop", images=extract.out("preview"))
        faces[f"person_{k + 1}"] = extract.out("faces")
        nodes += [photo, extract]
    identities = g.add("WithAnyoneIdentityEncode", (x + 3 * COL, y), siglip=siglip.out(), **faces)
    g.group(f"{count} {'person' if count == 1 else 'people'}, in layout order", nodes, color="#3f789e")
    return identities


def _decode_and_save(g: Graph, latent, vae, x: float, prefix: str):
    image = g.add("VAEDecode", (x, 0), samples=latent, vae=vae.out())
    g.add("SaveImage", (x + COL, 0), images=image.out(), filename_prefix=prefix)
    return image


AUTHORS_SCHEDULE = "withanyone (authors)"


def _sampler(g: Graph, unet, positive, negative, adapter, identities, layout, seed: int, batch_size: int = 1):
    """The all-in-one WithAnyone Sampler with the authors' recipe (their schedule, 25 Euler steps, guidance 4,
    cfg 1, SigLIP share 0)."""
    return g.add("WithAnyoneSampler", (2 * COL, 0), model=unet.out(), positive=positive.out(),
                 negative=negative.out(), adapter=adapter.out(), identities=identities.out(),
                 layout=layout.out("layout"), seed=seed, steps=recipe.DEFAULT_STEPS, cfg=1.0, sampler_name="euler",
                 schedule=AUTHORS_SCHEDULE, guidance=recipe.DEFAULT_GUIDANCE, batch_size=batch_size,
                 siglip_share=recipe.DEFAULT_SIGLIP_SHARE, weight_mode="share", id_weight=1.0, siglip_weight=0.0)


def single_person(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a portrait photo of a person laughing on a sunny beach, wind in the hair, 35mm film")
    identities = _people(g, 1, analyzer, siglip, x=0)
    layout = g.add("WithAnyoneLayout", (3 * COL, 300), width=recipe.DEFAULT_SIZE, height=recipe.DEFAULT_SIZE,
                   source="preset", people=1, boxes="0.38,0.18,0.62,0.50")
    g.add("PreviewImage", (4 * COL, 300), title="Where the face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=42)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/single")
    return g.to_ui("One person. Put a photo of the person in the Load Image node; the preset places the face.")


def _apply_and_custom_sampler(g: Graph, unet, positive, adapter, identities, layout, width, height, x,
                              lora: bool = False, seed: int = 7):
    """Apply WithAnyone + ComfyUI's SamplerCustomAdvanced with the WithAnyone Schedule (the authors' sigmas for the
    layout's size), Euler, FLUX guidance 4 and no CFG: the authors' recipe with stock sampling nodes."""
    patched = g.add("WithAnyoneApply", (x, 0), model=unet.out(), adapter=adapter.out(),
                    identities=identities.out(), layout=layout.out("layout"),
                    siglip_share=recipe.DEFAULT_SIGLIP_SHARE, weight_mode="share", id_weight=1.0, siglip_weight=0.0,
                    start_percent=0.0, end_percent=1.0)
    model = patched
    if lora:
        model = g.add("LoraLoaderModelOnly", (x, 260), title="Your FLUX LoRA (after Apply WithAnyone)",
                      model=patched.out(), lora_name=LORA_FILE, strength_model=0.8)
    guided = g.add("FluxGuidance", (x, 400), conditioning=positive.out(), guidance=recipe.DEFAULT_GUIDANCE)
    guider = g.add("BasicGuider", (x, 520), model=model.out(), conditioning=guided.out())
    noise = g.add("RandomNoise", (x, 620), noise_seed=seed)
    sampler = g.add("KSamplerSelect", (x, 740), sampler_name="euler")
    sigmas = g.add("WithAnyoneSchedule", (x, 840), steps=recipe.DEFAULT_STEPS, width=width, height=height,
                   layout=layout.out("layout"))
    empty = g.add("EmptySD3LatentImage", (x, 1000), width=width, height=height, batch_size=1)
    return g.add("SamplerCustomAdvanced", (x + COL, 0), noise=noise.out(), guider=guider.out(),
                 sampler=sampler.out(), sigmas=sigmas.out(), latent_image=empty.out())


def two_people_layout_from_photo(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "two friends sharing a pizza in a small Naples restaurant, warm evening light, candid photo")
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout_photo = g.add("LoadImage", (4 * COL, 880), title="Layout: a photo with two people placed as wanted",
                         image=LAYOUT_PHOTO)
    layout = g.add("WithAnyoneLayout", (5 * COL, 880), width=1024, height=768, source="image", people=2, boxes="",
                   layout_image=layout_photo.out("IMAGE"), face_analyzer=analyzer.out())
    g.add("PreviewImage", (6 * COL, 880), title="Face boxes found (left to right = person 1, 2)",
          images=layout.out("preview"))
    sampled = _apply_and_custom_sampler(g, unet, positive, adapter, identities, layout, 1024, 768, 2 * COL)
    _decode_and_save(g, sampled.out("output"), vae, 4 * COL, "WithAnyone/two_people")
    return g.to_ui("Two people; the face boxes come from an example photo (its faces, left to right). "
                   "Apply WithAnyone patches the model; ComfyUI's SamplerCustomAdvanced samples it with the "
                   "authors' schedule (WithAnyone Schedule).")


FOUR_BOXES = "72,190,256,374\n304,144,476,316\n548,144,720,316\n768,190,952,374"


def four_people_manual_layout(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "four colleagues posing for a team photo in a bright office, natural expressions, sharp focus")
    identities = _people(g, 4, analyzer, siglip, x=0)
    layout = g.add("WithAnyoneLayout", (4 * COL, 880), title="Four face boxes (pixels, one per line)",
                   width=1024, height=768, source="text", people=4, boxes=FOUR_BOXES)
    g.add("PreviewImage", (5 * COL, 880), title="Where each face goes", images=layout.out("preview"))
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=1234)
    _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/four_people")
    return g.to_ui("Four people with a hand-written layout: box k is person k. Edit the numbers to move faces.")


def with_lora(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "two people in a watercolor illustration, walking through a market, soft colors")
    identities = _people(g, 2, analyzer, siglip, x=0)
    layout = g.add("WithAnyoneLayout", (4 * COL, 880), width=recipe.DEFAULT_SIZE, height=recipe.DEFAULT_SIZE,
                   source="preset", people=2, boxes="0.18,0.22,0.40,0.52\n0.60,0.22,0.82,0.52")
    g.add("PreviewImage", (5 * COL, 880), images=layout.out("preview"))
    sampled = _apply_and_custom_sampler(g, unet, positive, adapter, identities, layout, recipe.DEFAULT_SIZE,
                                        recipe.DEFAULT_SIZE, 2 * COL, lora=True)
    _decode_and_save(g, sampled.out("output"), vae, 4 * COL, "WithAnyone/lora")
    return g.to_ui("A FLUX LoRA on top of WithAnyone: the LoRA loader goes after Apply WithAnyone (either order "
                   "works). Pick your LoRA in the loader.")


def identity_metrics(info: dict) -> dict:
    g = Graph(info)
    unet, positive, negative, vae, adapter, analyzer, siglip = _models(
        g, "a person reading a book in a cafe, side light, looking out of the window")
    identities = _people(g, 1, analyzer, siglip, x=0)
    layout = g.add("WithAnyoneLayout", (3 * COL, 300), width=recipe.DEFAULT_SIZE, height=recipe.DEFAULT_SIZE,
                   source="preset", people=1, boxes="0.38,0.18,0.62,0.50")
    latent = _sampler(g, unet, positive, negative, adapter, identities, layout, seed=3, batch_size=2)
    image = _decode_and_save(g, latent.out(), vae, 3 * COL, "WithAnyone/metrics")
    truth = g.add("LoadImage", (4 * COL, 880), title="Ground truth: another photo of the same person",
                  image=GROUND_TRUTH_PHOTO)
    g.add("WithAnyoneIdentityMetrics", (5 * COL, 300), image=image.out(), face_analyzer=analyzer.out(),
          identities=identities.out(), ground_truth=truth.out("IMAGE"))
    return g.to_ui("Copy-paste meter: Sim(Ref), Sim(GT) and CP of each generated face. CP near +1 means a copy of "
                   "the reference photo; near -1, the person as in the ground-truth photo.")


BUILDERS = {
    "withanyone_single_person": single_person,
    "withanyone_two_people_layout_from_photo": two_people_layout_from_photo,
    "withanyone_four_people_manual_layout": four_people_manual_layout,
    "withanyone_with_lora": with_lora,
    "withanyone_identity_metrics": identity_metrics,
}


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: build(object_info) for name, build in BUILDERS.items()}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from comfy_server import ComfyServer

    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = server.get_json("/object_info")
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(info).items():
        (WORKFLOWS_DIR / f"{name}.json").write_text(dumps(workflow))
        logging.info("wrote example_workflows/%s.json", name)


if __name__ == "__main__":
    main()
