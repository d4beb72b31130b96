"""Train from a ComfyUI install: find its model files and load them in the formats users have.

``models.comfyui: <ComfyUI folder>`` makes every model file come from that install's model
folders, with the folder names ComfyUI's nodes use (``diffusion_models``/``unet``, ``vae``,
``text_encoders``/``clip``, ``insightface``, ``siglip``, ``withanyone``) plus the folders its
``extra_model_paths.yaml`` adds (read as ComfyUI's ``utils/extra_config.py`` reads it:
``base_path``, one folder per line of a value, ``unet``/``clip`` as the legacy names).

Finding (:func:`resolve_comfyui_models`) reads only safetensors headers, so a missing, ambiguous
or unusable file fails before anything loads, naming the folders searched and what belongs
there. A file is recognised by its tensor names and shapes, never by its file name:

- FLUX: Black Forest Labs' single file (bf16/fp16/fp32, fp8 e4m3fn/e5m2, ComfyUI's scaled fp8
  with its ``scaled_fp8`` marker and per-layer ``.scale_weight``);
- the autoencoder: BFL's ``ae.safetensors`` (LDM key names) or a diffusers-layout single file,
  with as many latent channels as the FLUX takes;
- CLIP-L and T5: transformers' key names, as wide as the FLUX's pooled and text inputs.

Loading infers every configuration from tensor shapes (hidden sizes, layer counts, heads where
stored) and takes the tokenizers from the install's own tree (``comfy/sd1_tokenizer/``,
``comfy/text_encoders/t5_tokenizer/``). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from withanyone_core.offline import settle_bitsandbytes

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# ComfyUI's folder names (folder_paths.py) and the pack's own (nodes/loaders.py), with their default folders
DEFAULT_FOLDERS = {
    "diffusion_models": ("unet", "diffusion_models"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "insightface": ("insightface",),
    "siglip": ("siglip",),
    "withanyone": ("withanyone",),
}
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}  # folder_paths.map_legacy
CLIP_TOKENIZER = Path("comfy") / "sd1_tokenizer"
T5_TOKENIZER = Path("comfy") / "text_encoders" / "t5_tokenizer"
# FLUX.1's autoencoder constants (not stored in ae.safetensors; BFL's AutoEncoderParams)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159


class ComfyUIFilesError(ValueError):
    """A model file of the ComfyUI install is missing, ambiguous or unusable; the message says what to do."""


# ---------------------------------------------------------------- folders


def read_extra_model_paths(yaml_path: str | os.PathLike) -> list[tuple[str, Path, bool]]:
    """(kind, folder, is_default) entries an ``extra_model_paths.yaml`` adds, in ComfyUI's order.

    As ComfyUI's ``load_extra_path_config``: every top-level section may set ``base_path``
    (``~`` and ``$VARS`` expanded, relative to the yaml's folder) and ``is_default``; every other
    key is a folder kind whose value holds one folder per line, joined to ``base_path`` or,
    without one, relative to the yaml's folder; ``unet``/``clip`` are the legacy names of
    ``diffusion_models``/``text_encoders``.
    """
    import yaml

    yaml_path = Path(yaml_path)
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ComfyUIFilesError(f"{yaml_path} cannot be read as YAML ({exc}); fix or remove it") from exc
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    entries: list[tuple[str, Path, bool]] = []
    if raw is None:
        return entries
    if not isinstance(raw, dict):
        raise ComfyUIFilesError(
            f"{yaml_path}: expected sections (e.g. comfyui: {{base_path: ..., vae: ...}}), got {type(raw).__name__}"
        )
    for section, conf in raw.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise ComfyUIFilesError(f"{yaml_path}: section {section!r} must map folder kinds to paths")
        conf = dict(conf)
        base_path = None
        if "base_path" in conf:
            base_path = os.path.expandvars(os.path.expanduser(str(conf.pop("base_path"))))
            if not os.path.isabs(base_path):
                base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
        is_default = bool(conf.pop("is_default", False))
        for kind, value in conf.items():
            if not isinstance(value, str):
                raise ComfyUIFilesError(
                    f"{yaml_path}: {section}.{kind} must be a path, or several paths one per "
                    f"line (a | block), got {value!r}"
                )
            for line in value.split("\n"):
                if not line:
                    continue
                if base_path:
                    full = os.path.join(base_path, line)
                elif not os.path.isabs(line):
                    full = os.path.abspath(os.path.join(yaml_dir, line))
                else:
                    full = line
                entries.append((LEGACY_NAMES.get(kind, kind), Path(os.path.normpath(full)), is_default))
    return entries


def model_folders(comfyui: str | os.PathLike) -> dict[str, list[Path]]:
    """The folders ComfyUI searches per kind: ``models/<name>`` plus ``extra_model_paths.yaml``'s,
    ordered as ComfyUI's ``folder_paths.add_model_folder_path`` orders them."""
    root = Path(comfyui)
    folders = {kind: [root / "models" / name for name in names] for kind, names in DEFAULT_FOLDERS.items()}
    extra = root / "extra_model_paths.yaml"
    if extra.is_file():
        for kind, path, is_default in read_extra_model_paths(extra):
            paths = folders.setdefault(kind, [])
            if path in paths:
                if is_default and paths[0] != path:
                    paths.remove(path)
                    paths.insert(0, path)
            elif is_default:
                paths.insert(0, path)
            else:
                paths.append(path)
    return folders


def _files_in(folders: list[Path]) -> list[tuple[str, Path]]:
    """(name as ComfyUI lists it, path) of every file under ``folders``, recursively, sorted, de-duplicated."""
    seen, out = set(), []
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or (filename.startswith("put_") and filename.endswith("_here")):
                    continue  # ComfyUI's placeholder files (put_vae_here, ...)
                path = Path(dirpath) / filename
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                out.append((path.relative_to(folder).as_posix(), path))
    return out


# ---------------------------------------------------------------- what a file is


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    from withanyone_core.checkpoints.reading import read_safetensors_shapes

    return read_safetensors_shapes(path)


def _strip_flux_prefix(shapes: Mapping[str, object]) -> dict[str, object]:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(prefix + "double_blocks.") for k in shapes):
            return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    return dict(shapes)


@dataclass(frozen=True)
class FluxShape:
    in_channels: int  # packed (16 latent channels x 2 x 2)
    context_dim: int  # T5 width
    pooled_dim: int  # CLIP width


def flux_shape(shapes: Mapping[str, tuple[int, ...]]) -> FluxShape | str:
    """What a FLUX.1 in BFL layout takes, or why the file is not one."""
    s = _strip_flux_prefix(shapes)
    if "double_blocks.0.img_attn.norm.key_norm.scale" not in s:
        if "x_embedder.weight" in s and any(k.startswith("transformer_blocks.") for k in s):
            return "a FLUX in diffusers' layout (use Black Forest Labs' single file, e.g. flux1-dev.safetensors)"
        return "not a FLUX.1 transformer"
    if "double_stream_modulation_img.lin.weight" in s:
        return "a FLUX.2 transformer (FLUX.1 is what WithAnyone adapts)"
    if "img_in.weight" not in s or "txt_in.weight" not in s or "vector_in.in_layer.weight" not in s:
        return "a FLUX-like transformer without img_in/txt_in/vector_in (e.g. Chroma), not FLUX.1"
    return FluxShape(
        in_channels=s["img_in.weight"][1],
        context_dim=s["txt_in.weight"][1],
        pooled_dim=s["vector_in.in_layer.weight"][1],
    )


def vae_latent_channels(shapes: Mapping[str, tuple[int, ...]]) -> int | str:
    """Latent channels of an autoencoder in BFL/LDM or diffusers layout, or why the file is not one."""
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
        return "not an autoencoder"
    ldm = "encoder.down.0.block.0.conv1.weight" in shapes
    diffusers = "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes
    if not (ldm or diffusers):
        return "an autoencoder of an unknown layout"
    down = re.compile(
        r"encoder\.down\.\d+\.downsample\.conv\.weight$"
        if ldm
        else r"encoder\.down_blocks\.\d+\.downsamplers\.0\.conv\.weight$"
    )
    factor = 2 ** sum(1 for k in shapes if down.match(k))
    if factor != 8:  # FLUX packs 2x2 latent pixels into a 16-pixel token
        return f"an autoencoder with {factor}x smaller latents (FLUX's has 8x)"
    return shapes["decoder.conv_in.weight"][1]


def clip_width(shapes: Mapping[str, tuple[int, ...]]) -> int | str:
    if (
        "text_model.embeddings.token_embedding.weight" not in shapes
        or "text_model.encoder.layers.0.self_attn.q_proj.weight" not in shapes
    ):
        return "not a CLIP text encoder in transformers' layout"
    return shapes["text_model.embeddings.token_embedding.weight"][1]


def t5_width(shapes: Mapping[str, tuple[int, ...]]) -> int | str:
    if "encoder.block.0.layer.0.SelfAttention.q.weight" not in shapes:
        return "not a T5 encoder in transformers' layout"
    emb = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    if emb is None:
        return "a T5 encoder without its token embedding (shared.weight)"
    return emb[1]


# ---------------------------------------------------------------- choosing


@dataclass
class ComfyUIModels:
    """Every file a training run takes from a ComfyUI install (absolute paths)."""

    root: Path
    transformer: Path
    vae: Path
    clip_l: Path
    t5: Path
    clip_tokenizer: Path
    t5_tokenizer: Path
    adapter: Path | None = None
    antelopev2: Path | None = None
    siglip: Path | None = None


def _describe(folders: list[Path]) -> str:
    return ", ".join(str(f) + ("" if f.is_dir() else " (missing)") for f in folders)


def _choose(key: str, value: str | None, folders: list[Path], expected: str, check) -> Path:
    """The one file of ``folders`` that ``check`` accepts (``check(path) -> None | reason``).

    ``value`` (``models.<key>``) picks by path, by name as ComfyUI lists it (``sub/name``) or by
    file name; unset, exactly one acceptable file must be there.
    """
    files = [(name, path) for name, path in _files_in(folders)]
    if value and os.path.isabs(value):
        path = Path(value)
        if not path.is_file():
            raise ComfyUIFilesError(f"models.{key}: {path} is not a file (expected: {expected})")
        reason = check(path)
        if reason:
            raise ComfyUIFilesError(f"models.{key}={path} is {reason}; expected: {expected}")
        return path
    if value:
        matches = [(n, p) for n, p in files if n == value] or [(n, p) for n, p in files if p.name == value]
        if len(matches) > 1:
            raise ComfyUIFilesError(
                f"models.{key}={value} matches {len(matches)} files in {_describe(folders)}: "
                f"{', '.join(n for n, _ in matches)}; give the name with its subfolder or a path"
            )
        if not matches:
            listed = ", ".join(n for n, _ in files) or "no files"
            raise ComfyUIFilesError(
                f"models.{key}={value} is not in {_describe(folders)} (found: {listed}); "
                f"put the {expected} there or give its path"
            )
        name, path = matches[0]
        reason = check(path)
        if reason:
            raise ComfyUIFilesError(f"models.{key}={value} ({path}) is {reason}; expected: {expected}")
        return path
    good, skipped = [], []
    for name, path in files:
        if not name.lower().endswith(SAFETENSORS_SUFFIXES):
            skipped.append(f"{name} (not .safetensors)")
            continue
        reason = check(path)
        if reason:
            skipped.append(f"{name} ({reason})")
        else:
            good.append((name, path))
    if len(good) == 1:
        if skipped:
            logger.info("models.%s: using %s; not %s", key, good[0][1], "; ".join(skipped))
        return good[0][1]
    if not good:
        note = f"; skipped: {'; '.join(skipped)}" if skipped else ""
        raise ComfyUIFilesError(
            f"models.{key}: no {expected} in {_describe(folders)}{note}. Put it there or set models.{key} to its path"
        )
    raise ComfyUIFilesError(
        f"models.{key}: {len(good)} candidates for {expected} in {_describe(folders)}: "
        f"{', '.join(n for n, _ in good)}; choose one with models.{key}=<name> "
        f"(in the config or --set)"
    )


def _flux_check(path: Path) -> str | None:
    try:
        got = flux_shape(_header(path))
    except Exception as exc:  # noqa: BLE001
        return f"unreadable: {exc}"
    return got if isinstance(got, str) else None


def _fits(probe, want: int, what: str):
    def check(path: Path) -> str | None:
        try:
            got = probe(_header(path))
        except Exception as exc:  # noqa: BLE001
            return f"unreadable: {exc}"
        if isinstance(got, str):
            return got
        if got != want:
            return f"{what} {got} where the FLUX file takes {want}"
        return None

    return check


def _adapter_check(path: Path) -> str | None:
    from withanyone_core.checkpoints.adapter_files import adapter_keys

    try:
        return None if adapter_keys(_header(path)) else "not a WithAnyone adapter (no ipa_*/arcface_in* tensors)"
    except Exception as exc:  # noqa: BLE001
        return f"unreadable: {exc}"


def _find_antelopev2(folders: list[Path]) -> tuple[Path | None, list[str]]:
    from withanyone_core.faces import find_antelopev2_dir

    found, notes = [], []
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            find_antelopev2_dir(folder)
            found.append(folder)
        except Exception as exc:  # noqa: BLE001 - named in the error when it is needed
            notes.append(str(exc))
    return (found[0] if found else None), notes


def _siglip_candidates(folders: list[Path]) -> list[Path]:
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and (entry / "config.json").is_file() and any(entry.glob("*.safetensors")):
                out.append(entry)
            elif entry.is_file() and entry.name.lower().endswith(SAFETENSORS_SUFFIXES):
                out.append(entry)
    if not out:  # the folder itself may be the Hugging Face folder
        out = [f for f in folders if f.is_dir() and (f / "config.json").is_file() and any(f.glob("*.safetensors"))]
    return out


def resolve_comfyui_models(
    root: str | os.PathLike,
    *,
    transformer: str | None = None,
    vae: str | None = None,
    clip_l: str | None = None,
    t5: str | None = None,
    adapter: str | None = None,
    antelopev2: str | None = None,
    siglip: str | None = None,
    need_antelopev2: bool = False,
    need_siglip: bool = False,
) -> ComfyUIModels:
    """Find every file a run needs in the install at ``root``; raises :class:`ComfyUIFilesError`.

    Reads headers only. The text encoders and autoencoder must fit the chosen FLUX (CLIP as wide
    as its pooled input, T5 as its text input, the autoencoder's latent channels x 4 its image input),
    which also tells CLIP-L from CLIP-G and T5-XXL from smaller T5s.
    """
    root = Path(root)
    if not root.is_dir():
        raise ComfyUIFilesError(f"models.comfyui: {root} is not a folder (the ComfyUI folder holding models/)")
    if not (root / "models").is_dir() and (root / "ComfyUI" / "models").is_dir():
        logger.info("models.comfyui: using %s (the portable package's ComfyUI folder)", root / "ComfyUI")
        root = root / "ComfyUI"
    folders = model_folders(root)
    tokenizers = {"CLIP": root / CLIP_TOKENIZER, "T5": root / T5_TOKENIZER}
    for what, folder in tokenizers.items():
        if not folder.is_dir():
            raise ComfyUIFilesError(
                f"models.comfyui: {folder} does not exist; the {what} tokenizer is taken from "
                f"the install's own tree: set models.comfyui to the ComfyUI folder that holds "
                f"main.py and comfy/"
            )
    flux_path = _choose(
        "transformer",
        transformer,
        folders["diffusion_models"],
        "FLUX.1 transformer in Black Forest Labs' layout (flux1-dev.safetensors, or its fp8 file)",
        _flux_check,
    )
    shape = flux_shape(_header(flux_path))
    vae_path = _choose(
        "vae",
        vae,
        folders["vae"],
        f"FLUX.1 autoencoder (ae.safetensors, {shape.in_channels // 4} latent channels)",
        _fits(vae_latent_channels, shape.in_channels // 4, "latent channels"),
    )
    clip_path = _choose(
        "clip_l",
        clip_l,
        folders["text_encoders"],
        f"CLIP-L (clip_l.safetensors, width {shape.pooled_dim})",
        _fits(clip_width, shape.pooled_dim, "width"),
    )
    t5_path = _choose(
        "t5",
        t5,
        folders["text_encoders"],
        f"T5-XXL (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors, width {shape.context_dim})",
        _fits(t5_width, shape.context_dim, "width"),
    )
    found = ComfyUIModels(
        root=root,
        transformer=flux_path,
        vae=vae_path,
        clip_l=clip_path,
        t5=t5_path,
        clip_tokenizer=tokenizers["CLIP"],
        t5_tokenizer=tokenizers["T5"],
    )
    if adapter:
        found.adapter = _choose(
            "adapter", adapter, folders["withanyone"], "WithAnyone adapter (withanyone.safetensors)", _adapter_check
        )
    if antelopev2:
        found.antelopev2 = Path(antelopev2)
    else:
        found.antelopev2, notes = _find_antelopev2(folders["insightface"])
        if found.antelopev2 is None and need_antelopev2:
            detail = f" ({notes[0]})" if notes else ""
            raise ComfyUIFilesError(
                f"models.antelopev2: no antelopev2 face models in {_describe(folders['insightface'])}"
                f"{detail}; the ID losses need them: put scrfd_10g_bnkps.onnx and glintr100.onnx "
                f"in <insightface>/models/antelopev2/ or set models.antelopev2"
            )
    if siglip:
        found.siglip = Path(siglip)
    else:
        candidates = _siglip_candidates(folders["siglip"])
        if len(candidates) == 1:
            found.siglip = candidates[0]
        elif need_siglip:
            listed = ", ".join(str(c) for c in candidates)
            problem = (
                f"{len(candidates)} candidates ({listed}): choose one with models.siglip"
                if candidates
                else "none found: put siglip-base-patch16-256-i18n (folder or model.safetensors) there"
            )
            raise ComfyUIFilesError(
                f"models.siglip: the SigLIP branch trains but in {_describe(folders['siglip'])} {problem}"
            )
        elif len(candidates) > 1:
            logger.info(
                "models.siglip: %d SigLIP candidates in the install and the SigLIP branch does not train: none used",
                len(candidates),
            )
    for key in ("transformer", "vae", "clip_l", "t5"):
        logger.info("models.%s = %s", key, getattr(found, key))
    return found


# ---------------------------------------------------------------- loading


def dequantize_state(state: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "") -> dict[str, torch.Tensor]:
    """Weights of a single file in ``dtype``: fp8 (e4m3fn/e5m2) upcast, ComfyUI's scaled fp8 unscaled.

    ComfyUI's scaled-fp8 files hold a ``scaled_fp8`` marker tensor and, per fp8 layer, a
    ``<layer>.scale_weight`` by which the stored weight is multiplied (ComfyUI's
    ``scaled_fp8_ops``), and optionally a ``<layer>.scale_input`` (an inference-time input scale);
    ComfyUI's newer quantized files name them ``<layer>.weight_scale`` / ``<layer>.input_scale``.
    Works in place on ``state`` one tensor at a time (a 12 B FLUX is never held twice).
    """
    marker = [k for k in state if k == "scaled_fp8" or k.endswith(".scaled_fp8")]
    for k in marker:
        del state[k]
    scales = {}
    for suffix in (".scale_weight", ".weight_scale"):  # scaled fp8; ComfyUI's newer per-layer quantized files
        for k in [k for k in state if k.endswith(suffix)]:
            scales[k[: -len(suffix)]] = state.pop(k)
    for k in [k for k in state if k.endswith((".scale_input", ".input_scale"))]:
        del state[k]
    used = set()
    for key in list(state):
        value = state[key]
        if not value.is_floating_point():
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and layer in scales:
            value = value.to(torch.float32) * scales[layer].to(torch.float32)
            used.add(layer)
        out = value.to(dtype)
        if not torch.isfinite(out).all():
            raise ComfyUIFilesError(f"{source}: tensor {key} has non-finite values in {dtype} (a damaged file?)")
        state[key] = out
    unused = sorted(set(scales) - used)
    if unused:
        raise ComfyUIFilesError(
            f"{source}: scale_weight without a weight for {', '.join(unused[:5])}: the file is incomplete"
        )
    return state


def load_flux(path: str | os.PathLike, dtype: torch.dtype):
    """diffusers ``FluxTransformer2DModel`` from a BFL single file of any of the formats above."""
    from withanyone_core.checkpoints.reading import load_safetensors
    from withanyone_core.hosts.diffusers import flux_from_bfl_state

    state = _strip_flux_prefix(load_safetensors(path))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    logger.info("FLUX from %s (stored as %s) in %s", path, ", ".join(dtypes), dtype)
    return flux_from_bfl_state(dequantize_state(state, dtype, str(path)), dtype=dtype)


def _ldm_vae_config(state: Mapping[str, torch.Tensor]) -> dict:
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    downs = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    blocks = sorted({int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")})
    channels = [state[f"encoder.down.{i}.block.{len(blocks) - 1}.conv2.weight"].shape[0] for i in downs]
    ch = state["encoder.conv_in.weight"].shape[0]
    ddconfig = {
        "ch": ch,
        "ch_mult": [c // ch for c in channels],
        "num_res_blocks": len(blocks),
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_ch": state["decoder.conv_out.weight"].shape[0],
        "z_channels": state["decoder.conv_in.weight"].shape[1],
    }
    if [ch * m for m in ddconfig["ch_mult"]] != channels:
        raise ComfyUIFilesError(f"autoencoder block widths {channels} are not multiples of its first width {ch}")
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    return create_vae_diffusers_config_from_ldm(original, state, scaling_factor=FLUX_VAE_SCALING)


def _diffusers_vae_config(state: Mapping[str, torch.Tensor]) -> dict:
    downs = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    resnets = sorted({int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    channels = [state[f"encoder.down_blocks.{i}.resnets.{len(resnets) - 1}.conv2.weight"].shape[0] for i in downs]
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(resnets),
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "scaling_factor": FLUX_VAE_SCALING,
    }


def _norm_groups(channels: list[int]) -> int:
    """GroupNorm groups (not stored in a file): the autoencoders' 32 where every width allows it."""
    import math

    common = 0
    for c in channels:
        common = math.gcd(common, c)
    return 32 if common % 32 == 0 else max(g for g in range(1, min(32, common) + 1) if common % g == 0)


def load_vae(path: str | os.PathLike, dtype: torch.dtype):
    """diffusers ``AutoencoderKL`` from ``ae.safetensors`` (BFL/LDM keys) or a diffusers-layout single file.

    The BFL keys go through diffusers' own single-file converter (``convert_ldm_vae_checkpoint``);
    the configuration comes from the shapes. FLUX.1's scaling (0.3611) and shift (0.1159) are not in
    the file and apply to a 16-channel autoencoder; GroupNorm's 32 groups are used where the widths allow.
    """
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from withanyone_core.checkpoints.reading import load_safetensors

    state = load_safetensors(path)
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = dequantize_state(state, dtype, str(path))
    if "encoder.down.0.block.0.conv1.weight" in state:
        config = _ldm_vae_config(state)
        mapped = convert_ldm_vae_checkpoint(state, config)
    else:
        config = _diffusers_vae_config(state)
        mapped = state
    config.pop("sample_size", None)
    config["use_quant_conv"] = "quant_conv.weight" in mapped
    config["use_post_quant_conv"] = "post_quant_conv.weight" in mapped
    config["norm_num_groups"] = _norm_groups(list(config["block_out_channels"]))
    if config["latent_channels"] == 16:
        config["shift_factor"] = FLUX_VAE_SHIFT
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(mapped, strict=False, assign=True)
    if missing or unexpected:
        raise ComfyUIFilesError(
            f"{path}: the autoencoder does not match diffusers' AutoencoderKL: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return vae.to(dtype)


def _count(state: Mapping[str, object], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    if found != set(range(len(found))):
        raise ComfyUIFilesError(f"layers {sorted(found)} are not numbered 0..{len(found) - 1}: the file is incomplete")
    return len(found)


def _tokenizer(folder: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ComfyUIFilesError(
            f"the {what} tokenizer in {folder} cannot be read ({exc}); it comes with ComfyUI: "
            "models.comfyui must be a complete ComfyUI folder"
        ) from exc


def _check_vocab(tokenizer, rows: int, path, what: str) -> None:
    if len(tokenizer) > rows:
        raise ComfyUIFilesError(
            f"{path}: the {what} has {rows} token embeddings but the install's tokenizer has "
            f"{len(tokenizer)} tokens; this is not the text encoder its tokenizer belongs to"
        )


def load_clip_l(path: str | os.PathLike, tokenizer_dir: Path, dtype: torch.dtype):
    """(tokenizer, CLIPTextModel) from a transformers-layout single file; configuration from shapes.

    Heads are not stored: CLIP's 64-wide heads (12 for CLIP-L). The tokenizer's declared
    model_max_length (8192 in ComfyUI's copy) is cut to the model's positions (77 for CLIP-L).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from withanyone_core.checkpoints.reading import load_safetensors

    state = dequantize_state(load_safetensors(path), dtype, str(path))
    state = {k: v for k, v in state.items() if k.startswith("text_model.")}
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    tokenizer = _tokenizer(tokenizer_dir, "CLIP")
    _check_vocab(tokenizer, vocab, path, "CLIP text encoder")
    tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=positions,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(state, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64) if hidden % 64 == 0 else 1,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer, _assemble(CLIPTextModel, config, state, path, dtype)


def load_t5(path: str | os.PathLike, tokenizer_dir: Path, dtype: torch.dtype):
    """(tokenizer, T5EncoderModel) from a transformers-layout single file (fp16/bf16/fp8, scaled fp8).

    Heads come from the relative attention bias table; the feed-forward is gated GELU when the
    file has ``wi_0``/``wi_1`` (T5 v1.1, FLUX's T5-XXL), ReLU with a single ``wi``.
    """
    from transformers import T5Config, T5EncoderModel

    from withanyone_core.checkpoints.reading import load_safetensors

    state = dequantize_state(load_safetensors(path), dtype, str(path))
    state = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
    if "shared.weight" not in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    vocab, d_model = state["shared.weight"].shape
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    tokenizer = _tokenizer(tokenizer_dir, "T5")
    _check_vocab(tokenizer, vocab, path, "T5 encoder")
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=d_ff,
        num_layers=_count(state, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, _assemble(T5EncoderModel, config, state, path, dtype)


def _assemble(cls, config, state: dict[str, torch.Tensor], path, dtype: torch.dtype):
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if (
        "text_model.embeddings.token_embedding.weight" in state
        and "text_model.embeddings.token_embedding.weight" not in expected
    ):  # transformers 5 drops the prefix
        state = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in state.items()}
    missing = sorted(expected - set(state))
    # position_ids is a buffer some transformers versions keep; built from the config, never read from files
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    unexpected = sorted(set(state) - expected)
    if missing:
        raise ComfyUIFilesError(f"{path}: {cls.__name__} needs {missing[:5]} which the file lacks")
    if unexpected:
        logger.info("%s: %d tensors not used by %s (e.g. %s)", path, len(unexpected), cls.__name__, unexpected[:3])
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers: rebuilt from the config on the CPU
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if attr == "position_ids":
                module.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:
                raise ComfyUIFilesError(f"{path}: {cls.__name__} buffer {name} cannot be built outside its config")
    return model.to(dtype).eval().requires_grad_(False)
