"""Face extraction and identity encoding nodes."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..withanyone_core.faces.analysis import DEFAULT_FACE_CHOICE, FACE_CHOICES, FaceIndexError, count_noun
from .types import FACE_ANALYZER, FACES, IDENTITIES, SIGLIP, FacePhoto, Faces, Identities

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
MAX_PERSONS = 4
NO_FACE_POLICIES = ("error", "skip")
TILE_SIDE = 256  # the labelled tiles shown on the node after a run


def _photo_pixels(image: torch.Tensor, name: str) -> np.ndarray:
    """One IMAGE item -> RGB uint8 through the core's conversion (alpha dropped, with a log line)."""
    from ..withanyone_core.faces import to_rgb_uint8

    pixels = image.detach().cpu().float().numpy()
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        logger.info(
            "%s has an alpha channel: it is ignored (to blank the background of the SigLIP crop, "
            "connect it as the mask input)",
            name,
        )
    return to_rgb_uint8(pixels, name)


def _mattes(mask: torch.Tensor | None, photos: int) -> list[torch.Tensor | None]:
    """The mask input -> one [H, W] matte per photo (a single mask serves every photo)."""
    if mask is None:
        return [None] * photos
    mask = mask.detach().cpu().float()
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, photos):
        raise ValueError(
            f"mask is a batch of {mask.shape[0]} but image has {count_noun(photos, 'photo')}: give one "
            "mask per photo, or a single mask for all of them"
        )
    return [mask[0 if mask.shape[0] == 1 else i] for i in range(photos)]


def _matte_at(matte: torch.Tensor, height: int, width: int, name: str) -> np.ndarray:
    """A matte resized to its photo's size (bilinear) when the two differ."""
    if tuple(matte.shape) != (height, width):
        mh, mw = matte.shape
        if abs(mw / mh - width / height) > 0.01 * width / height:
            logger.warning(
                "the mask for %s is %dx%d but the photo is %dx%d: it is stretched to the photo",
                name,
                mw,
                mh,
                width,
                height,
            )
        matte = torch.nn.functional.interpolate(
            matte[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
    return matte.clamp(0, 1).numpy()


def _tile(crop: np.ndarray | None, caption: str) -> np.ndarray:
    """A TILE_SIDE square for the node's display: the crop (or a blank) with a caption strip."""
    from PIL import Image, ImageDraw

    if crop is None:
        tile = Image.new("RGB", (TILE_SIDE, TILE_SIDE), (60, 30, 30))
    else:
        tile = Image.fromarray(crop).resize((TILE_SIDE, TILE_SIDE), Image.BILINEAR)
    draw = ImageDraw.Draw(tile)
    lines = caption.split("\n")
    draw.rectangle([0, TILE_SIDE - 14 * len(lines) - 6, TILE_SIDE, TILE_SIDE], fill=(0, 0, 0))
    for k, line in enumerate(lines):
        draw.text((5, TILE_SIDE - 14 * (len(lines) - k) - 2), line, fill=(235, 235, 235))
    return np.asarray(tile)


class WithAnyoneFaceExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneFaceExtract",
            display_name="WithAnyone Face Extract",
            category=CATEGORY,
            description="Finds the reference face in every photo of the batch (one person, several photos allowed; "
            "by default the face with the highest detection score, as the authors do). Outputs the "
            "faces and the SigLIP crops; the node shows which face each photo gave.",
            inputs=[
                io.Image.Input("image", tooltip="photos of ONE person (a batch of several photos is averaged)"),
                FACE_ANALYZER.Input("face_analyzer", tooltip="from Load WithAnyone Face Analyzer (antelopev2)"),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=-1,
                    max=32,
                    tooltip="which face of a photo with several, counted in the face_choice order: 0 = the "
                    "first (-1, from older workflows, is the same as 0)",
                ),
                io.Int.Input(
                    "min_face_size",
                    default=64,
                    min=0,
                    max=2048,
                    tooltip="ignore faces whose shorter side is below this many pixels",
                ),
                io.Combo.Input(
                    "face_choice",
                    options=list(FACE_CHOICES),
                    default=DEFAULT_FACE_CHOICE,
                    optional=True,
                    tooltip="how the faces of a photo are ranked: highest score (the authors' choice: "
                    "the detector's most confident face), largest, or left to right",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="optional: white = the person, black = background (e.g. from a background-"
                    "removal node), one per photo or one for all. The SigLIP crop's background "
                    "is blanked to black, as the authors' BiRefNet matting does; the ArcFace "
                    "embedding is unchanged. Recommended when the SigLIP share is above 0",
                ),
                io.Combo.Input(
                    "no_face",
                    options=list(NO_FACE_POLICIES),
                    default="error",
                    optional=True,
                    tooltip="a photo without a usable face: error stops the run; skip leaves it out "
                    "(named in the log and on the node). All photos without one is an error",
                ),
            ],
            outputs=[
                FACES.Output(
                    display_name="faces",
                    tooltip="one reference face per photo: its ArcFace embedding and SigLIP crop, for Identity Encode",
                ),
                io.Image.Output(
                    display_name="preview",
                    tooltip="the SigLIP crops (512 px, background blanked where a mask is given), "
                    "one per photo with a face",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        face_analyzer,
        face_index: int,
        min_face_size: int,
        face_choice: str = DEFAULT_FACE_CHOICE,
        mask: torch.Tensor | None = None,
        no_face: str = "error",
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        from ..withanyone_core.faces import NoFaceError, select_face, siglip_crop
        from ..withanyone_core.identity_store import image_sha256

        if no_face not in NO_FACE_POLICIES:
            raise ValueError(f"no_face must be one of {', '.join(NO_FACE_POLICIES)}, got {no_face!r}")
        total = image.shape[0]
        mattes = _mattes(mask, total)
        photos, tiles, skipped = [], [], []
        bar = comfy.utils.ProgressBar(total)
        for i in range(total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            name = f"photo {i + 1} of {total}"
            pixels = _photo_pixels(image[i], name)
            faces = face_analyzer.detect(pixels)
            try:
                face = select_face(
                    faces,
                    index=face_index,
                    image_name=name,
                    min_size=min_face_size,
                    choice=face_choice,
                    det_thresh=getattr(face_analyzer, "det_thresh", None),
                )
            except NoFaceError as err:
                if no_face == "error" or isinstance(err, FaceIndexError):
                    raise
                logger.warning("skipping %s: %s", name, err)
                skipped.append((i, str(err)))
                tiles.append(_tile(None, f"photo {i + 1}/{total}: SKIPPED\nno usable face"))
                bar.update(1)
                continue
            face_analyzer.embed(pixels, [face])
            matte = None if mattes[i] is None else _matte_at(mattes[i], pixels.shape[0], pixels.shape[1], name)
            crop = siglip_crop(pixels, face, matte=matte)
            photos.append(
                FacePhoto(
                    i,
                    tuple(float(v) for v in face.bbox),
                    face.embedding,
                    crop,
                    face.score,
                    matte is not None,
                    image_sha256(pixels),
                )
            )
            tiles.append(
                _tile(
                    crop,
                    f"photo {i + 1}/{total}: {face.width:.0f} px face\n"
                    f"score {face.score:.2f} of {count_noun(len(faces), 'face')}"
                    + (" (masked)" if matte is not None else ""),
                )
            )
            bar.update(1)
        if not photos:
            which = "the photo has" if total == 1 else f"none of the {total} photos has"
            raise NoFaceError(
                f"{which} a usable face (no_face = skip leaves out photos without one, but at least "
                "one must have a face): " + "; ".join(m for _, m in skipped)
            )
        summary = f"{count_noun(len(photos), 'photo')} used"
        if skipped:
            summary += f"; skipped (no usable face): {', '.join(f'photo {i + 1}' for i, _ in skipped)}"
            logger.warning("Face Extract: %s", summary)
        preview = torch.from_numpy(np.stack([p.siglip_crop for p in photos]).astype(np.float32) / 255.0)
        shown = torch.from_numpy(np.stack(tiles).astype(np.float32) / 255.0)
        node_ui = {**ui.PreviewImage(shown).as_dict(), "text": [summary]}
        return io.NodeOutput(Faces(tuple(photos), tuple(i for i, _ in skipped)), preview, ui=node_ui)


def _persons_in_order(slots: list) -> list:
    """The connected persons; a gap (person_3 without person_2) is refused: box k belongs to person k."""
    connected = [k + 1 for k, p in enumerate(slots) if p is not None]
    if not connected or connected[0] != 1:
        raise ValueError("connect person_1 first (box 1 of the layout belongs to person 1)")
    missing = [k for k in range(1, connected[-1]) if k not in connected]
    if missing:
        names = ", ".join(f"person_{k}" for k in missing)
        raise ValueError(
            f"person_{connected[-1]} is connected but {names} {'is' if len(missing) == 1 else 'are'} not: connect "
            f"the persons in order without gaps (layout box k belongs to person k), e.g. move person_{connected[-1]} "
            f"to {'person_' + str(missing[0])}"
        )
    return [slots[k - 1] for k in connected]


def encode_person(siglip, person: Faces) -> tuple[torch.Tensor, torch.Tensor]:
    """One person's (raw ArcFace [512], SigLIP [tokens, 768]), CPU float32: the mean over their photos. Saved
    identities are written from this same function, so a saved person equals a freshly encoded one bit for bit."""
    arcface = torch.from_numpy(np.mean([p.embedding for p in person.photos], axis=0)).float()
    features = siglip.encoder.encode([p.siglip_crop for p in person.photos]).float().cpu()
    return arcface, features.mean(dim=0)


class WithAnyoneIdentityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneIdentityEncode",
            display_name="WithAnyone Identity Encode",
            category=CATEGORY,
            description="Persons 1-4, in order without gaps (person k goes into layout box k). Several photos of "
            "one person: their raw ArcFace embeddings and SigLIP features are averaged.",
            inputs=[
                SIGLIP.Input(
                    "siglip",
                    optional=True,
                    tooltip="from Load WithAnyone SigLIP; only people fresh from Face Extract need it "
                    "(saved identities from Load WithAnyone Identity are already encoded)",
                ),
                FACES.Input(
                    "person_1",
                    tooltip="faces of person 1 (layout box 1), from Face Extract, or a saved "
                    "person from Load WithAnyone Identity",
                ),
                FACES.Input("person_2", optional=True, tooltip="person 2 (box 2); connect persons in order"),
                FACES.Input("person_3", optional=True, tooltip="person 3 (box 3); needs person 2"),
                FACES.Input("person_4", optional=True, tooltip="person 4 (box 4); needs person 3"),
            ],
            outputs=[
                IDENTITIES.Output(
                    display_name="identities", tooltip="the persons in order, for Apply WithAnyone / the sampler"
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        siglip=None,
        person_1: Faces | None = None,
        person_2: Faces | None = None,
        person_3: Faces | None = None,
        person_4: Faces | None = None,
    ) -> io.NodeOutput:
        import comfy.model_management

        persons = _persons_in_order([person_1, person_2, person_3, person_4])
        fresh = [k + 1 for k, p in enumerate(persons) if p.encoded is None]
        if fresh and siglip is None:
            names = ", ".join(f"person_{k}" for k in fresh)
            raise ValueError(
                f"{names} {'comes' if len(fresh) == 1 else 'come'} from Face Extract and must be encoded "
                "with SigLIP: connect Load WithAnyone SigLIP to siglip (only saved identities from "
                "Load WithAnyone Identity need none)"
            )
        if fresh:
            comfy.model_management.load_models_gpu([siglip.patcher])
        from ..withanyone_core.identity_store import check_encoded

        arcface, features = [], []
        for k, person in enumerate(persons, 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if person.encoded is not None:
                arc, feats = person.encoded.arcface, person.encoded.siglip
            else:
                arc, feats = encode_person(siglip, person)
            check_encoded(arc, feats, f"person_{k}")  # non-finite or absurd values would make a black image
            arcface.append(arc)
            features.append(feats)
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) > 1:
            raise ValueError(
                f"the persons' SigLIP features differ in shape ({', '.join(map(str, sorted(shapes)))}): "
                "a saved identity was encoded with another SigLIP model; save it again with the one "
                "connected here"
            )
        return io.NodeOutput(
            Identities(
                torch.stack(arcface),
                torch.stack(features),
                tuple(p.encoded.photos if p.encoded is not None else len(p.photos) for p in persons),
            )
        )


NODES = [WithAnyoneFaceExtract, WithAnyoneIdentityEncode]
