"""Save / Load WithAnyone Identity: a person encoded once, used again without antelopev2 or SigLIP.

The unit is one person per file. Save sits between Face Extract and Identity Encode (it encodes the person with
the same function Identity Encode uses and passes them on, already encoded); Load outputs the person in the
same FACES socket, so saved and freshly extracted people mix in Identity Encode's person order, and the person
alone as IDENTITIES, ready for Apply WithAnyone. File format: withanyone_core/identity_store.py.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..withanyone_core.identity_store import (
    IdentityFileError,
    SavedIdentity,
    SavedPhoto,
    file_name,
    load_identity,
    normalize_name,
    save_identity,
)
from .faces import encode_person
from .loaders import IDENTITIES_SUBFOLDER
from .types import FACES, IDENTITIES, SIGLIP, EncodedPerson, Faces, Identities

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
FOLDER = "withanyone_identities"  # folder_paths name of models/withanyone/identities/


def register_identity_folder() -> list[str]:
    """``withanyone_identities`` = the identities/ subfolder of every models/withanyone/ root (idempotent)."""
    wanted = [os.path.join(root, IDENTITIES_SUBFOLDER) for root in folder_paths.get_folder_paths("withanyone")]
    if not wanted:
        wanted = [os.path.join(folder_paths.models_dir, "withanyone", IDENTITIES_SUBFOLDER)]
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    # the withanyone roots first (a save goes to the first), then any other folder configured for identities
    paths = wanted + [p for p in paths if p not in wanted]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})
    return paths


def identity_choices() -> list[str]:
    register_identity_folder()
    return folder_paths.get_filename_list(FOLDER)


def save_target(name: str) -> str:
    """Where Save WithAnyone Identity writes ``name``: ``<first identities folder>/<file_name(name)>``, or the file
    already there whose name is the same once Unicode-normalised (a file saved as "Zoë" in NFD by another tool or
    an older pack is the same person as "Zoë" typed in NFC)."""
    folder = register_identity_folder()[0]
    wanted = file_name(name)
    target = os.path.join(folder, wanted)
    if not os.path.exists(target) and os.path.isdir(folder):
        same = sorted(f for f in os.listdir(folder) if f != wanted and file_name_or_none(f) == wanted)
        if same:
            return os.path.join(folder, same[0])
    return target


def file_name_or_none(name: str) -> str | None:
    try:
        return file_name(name)
    except IdentityFileError:
        return None


def file_state(path: str) -> str:
    """What ComfyUI's cache compares for a file: its size and time, or that it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def missing_identity_message(identity_name: str) -> str:
    folders = ", ".join(register_identity_folder())
    return (
        f"no saved identity {identity_name!r} in models/withanyone/identities/ ({folders}): save the person "
        f"first with a Save WithAnyone Identity node (the workflow 'WithAnyone - save people' saves "
        f"person_1 and person_2), then press R in ComfyUI to refresh the list"
    )


def _photo_record(photo) -> SavedPhoto:
    return SavedPhoto(photo.image_index, photo.bbox, photo.score, photo.masked, photo.image_sha256)


class WithAnyoneSaveIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneSaveIdentity",
            display_name="Save WithAnyone Identity",
            category=CATEGORY,
            description="Encodes one person (all photos of the Face Extract batch, as Identity Encode does) and "
            "saves the result as models/withanyone/identities/<name>.safetensors: ArcFace embeddings, "
            "SigLIP features, the photos' hashes and face boxes. Load WithAnyone Identity uses it "
            "again without the face analyzer or SigLIP. Connect its output to Identity Encode.",
            inputs=[
                FACES.Input("faces", tooltip="one person's faces, from Face Extract"),
                SIGLIP.Input("siglip", tooltip="from Load WithAnyone SigLIP (the features are saved with the person)"),
                io.String.Input(
                    "name",
                    default="person",
                    tooltip="the person's name; the file is <name>.safetensors in models/withanyone/identities/",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="replace a saved person of this name whose identity differs (saving the "
                    "same identity again is always fine)",
                ),
            ],
            outputs=[
                FACES.Output(
                    display_name="faces", tooltip="the same person, already encoded: connect to Identity Encode"
                )
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, name=None, overwrite=None, **_linked):
        """The target file's state is part of what the node depends on: a file changed by hand since the last run
        makes ComfyUI run the node again instead of answering from its cache, and a missing file always does (its
        state before the first save was "missing" too, so a file deleted after it would look unchanged)."""
        if not isinstance(name, str):
            return float("nan")  # a name from another node: never cached (NaN differs from itself)
        target = save_target(name)
        state = file_state(target)
        return float("nan") if state == "missing" else f"{target}:{overwrite}:{state}"

    @classmethod
    def execute(cls, faces: Faces, siglip, name: str, overwrite: bool = False) -> io.NodeOutput:
        import comfy.model_management

        name = normalize_name(name)
        target = save_target(name)  # refuses a name that gives no file name, or a too long one, before encoding
        if faces.encoded is not None and not faces.photos:
            raise ValueError(
                f"this person was loaded from {faces.encoded.source or 'a saved identity'} and is saved "
                "already: copy that file to keep it under another name"
            )
        comfy.model_management.load_models_gpu([siglip.patcher])
        arcface, features = encode_person(siglip, faces)
        per_photo = torch.from_numpy(np.stack([np.asarray(p.embedding, dtype=np.float32) for p in faces.photos]))
        identity = SavedIdentity(
            name=name or "person",
            arcface=arcface,
            siglip=features,
            photo_embeddings=per_photo,
            photos=tuple(_photo_record(p) for p in faces.photos),
            skipped=faces.skipped,
        )
        if os.path.exists(target):
            try:
                existing = load_identity(target)
            except IdentityFileError:
                existing = None
            if existing is not None and existing.same_identity(identity):
                logger.info("Save WithAnyone Identity: %s holds this identity already; left as it is", target)
                status = f"{os.path.basename(target)}: already saved (unchanged)"
            elif not overwrite:
                raise FileExistsError(
                    f"{target} holds another identity: choose another name, or set overwrite to true to replace it"
                )
            else:
                save_identity(target, identity)
                status = f"replaced {os.path.basename(target)}"
        else:
            save_identity(target, identity)
            status = f"saved {os.path.basename(target)}"
        status += f" ({len(faces.photos)} photo{'s' if len(faces.photos) != 1 else ''})"
        encoded = EncodedPerson(arcface, features, len(faces.photos), identity.name, os.path.basename(target))
        return io.NodeOutput(Faces(faces.photos, faces.skipped, encoded), ui={"text": [status]})


class WithAnyoneLoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneLoadIdentity",
            display_name="Load WithAnyone Identity",
            category=CATEGORY,
            description="A person saved with Save WithAnyone Identity (models/withanyone/identities/). Needs neither "
            "the face analyzer nor SigLIP. Connect person to an Identity Encode person_k slot to mix "
            "saved and new people, or identities straight to Apply WithAnyone for this person alone.",
            inputs=[
                io.Combo.Input(
                    "identity_name",
                    options=identity_choices(),
                    tooltip="a saved person in models/withanyone/identities/",
                )
            ],
            outputs=[
                FACES.Output(
                    display_name="person",
                    tooltip="the saved person, already encoded: connect to Identity Encode person_k",
                ),
                IDENTITIES.Output(
                    display_name="identities", tooltip="this person alone, for Apply WithAnyone / the sampler"
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, identity_name: str):
        """In place of ComfyUI's "Value not in list": a missing person says where they are looked for and how to
        save them."""
        return True if identity_name in identity_choices() else missing_identity_message(identity_name)

    @classmethod
    def fingerprint_inputs(cls, identity_name: str):
        register_identity_folder()
        path = folder_paths.get_full_path(FOLDER, identity_name)
        if path is None:
            return identity_name
        return f"{identity_name}:{file_state(path)}"  # a file saved again is read again

    @classmethod
    def execute(cls, identity_name: str) -> io.NodeOutput:
        if identity_name not in identity_choices():  # deleted since the prompt was validated
            raise FileNotFoundError(missing_identity_message(identity_name))
        path = folder_paths.get_full_path_or_raise(FOLDER, identity_name)
        saved = load_identity(path)
        person = EncodedPerson(saved.arcface, saved.siglip, len(saved.photos), saved.name, identity_name)
        identities = Identities(saved.arcface[None], saved.siglip[None], (len(saved.photos),))
        summary = (
            f"{saved.name}: {len(saved.photos)} photo{'s' if len(saved.photos) != 1 else ''}, saved "
            f"{saved.created or 'at an unknown time'} by pack {saved.pack_version}"
        )
        return io.NodeOutput(Faces((), (), person), identities, ui={"text": [summary]})


NODES = [WithAnyoneSaveIdentity, WithAnyoneLoadIdentity]
