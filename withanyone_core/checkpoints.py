"""Safe checkpoint loading and key maps.

- Only safetensors are read: pickled ``.pt``/``.bin``/``.ckpt`` files can run code
  when loaded and are refused with a message saying how to convert them.
- The identity adapter is recognised in the official key layouts: two-branch
  (``ipa_arc.N.*``, ``ipa_sig.N.*``, ``arcface_in_arc.*``, ``arcface_in_sig.*``,
  ``siglip_in_sig.*``: WithAnyone on FLUX.1, and WithAnyone.K) and ArcFace-only
  (``ipa.N.*``, ``arcface_in.*``, an unused ``siglip_in.*`` optional: WithAnyone.Ke on
  FLUX.1 Kontext); its size is inferred from the tensor shapes, its variant from the
  keys (K from a name or metadata, see :func:`infer_adapter_variant`).
- FLUX checkpoints in Black Forest Labs' layout (``double_blocks.N.img_attn.qkv``...)
  are mapped to diffusers' ``FluxTransformer2DModel`` names for any hidden size
  (diffusers' own single-file converter assumes 3072).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .adapter import ADAPTER_VARIANTS, ARC_TOKENS, AdapterConfig, IdentityAdapter, adapter_for_config

logger = logging.getLogger(__name__)

TWO_BRANCH_PREFIXES = ("ipa_arc.", "ipa_sig.", "arcface_in_arc.", "arcface_in_sig.", "siglip_in_sig.")
ARCFACE_ONLY_PREFIXES = ("ipa.", "arcface_in.", "siglip_in.")
ADAPTER_PREFIXES = TWO_BRANCH_PREFIXES + ARCFACE_ONLY_PREFIXES
# the Kontext module's SigLIP projector: defined, never read by its ArcFace-only path
UNUSED_ARCFACE_ONLY_PREFIXES = ("siglip_in.",)
VARIANT_METADATA_KEY = "withanyone_variant"

_WRAPPER_PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "_orig_mod.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying what to do."""


# --------------------------------------------------------------------------- reading
def _check_safetensors_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickled checkpoints ({path.suffix}) can execute code when loaded and are not read. "
            "Convert it once in a trusted environment, e.g. "
            "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`, "
            "and load the .safetensors file instead."
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # a safetensors file starts with an 8-byte little-endian header length and then '{'
    if len(head) < 9 or head[8:9] != b"{":
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{path.name} is a pickled torch checkpoint with a .safetensors name; it is not read. "
                "Convert it to real safetensors (safetensors.torch.save_file) first."
            )
        raise CheckpointError(f"{path.name} is not a safetensors file (bad header); re-download or re-export it")
    return path


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a dict of tensors (never unpickles)."""
    from safetensors.torch import load_file

    path = _check_safetensors_path(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path.name} could not be read as safetensors ({exc}); the file may be truncated") from exc


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file without loading its data."""
    from safetensors import safe_open

    path = _check_safetensors_path(path)
    with safe_open(str(path), framework="pt") as fh:
        return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty if none)."""
    from safetensors import safe_open

    with safe_open(str(_check_safetensors_path(path)), framework="pt") as fh:
        return dict(fh.metadata() or {})


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP), ``model.diffusion_model.`` (ComfyUI) and similar prefixes."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


# --------------------------------------------------------------------------- adapter
def adapter_keys(state: Mapping[str, object]) -> dict[str, object]:
    """The adapter's entries of a state dict (which may also hold FLUX weights)."""
    return {k: v for k, v in state.items() if k.startswith(ADAPTER_PREFIXES)}


def detect_adapter_layout(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``two_branch`` or ``arcface_only`` from the key names, or a :class:`CheckpointError` saying what it is."""
    names = set(shapes)
    two = any(k.startswith(TWO_BRANCH_PREFIXES) for k in names)
    one = any(k.startswith(("ipa.", "arcface_in.")) for k in names)
    if two and one:
        raise CheckpointError(
            "this file mixes the two-branch keys (ipa_arc.*, ipa_sig.*) with the ArcFace-only keys (ipa.*, "
            "arcface_in.*) of WithAnyone.Ke: it holds two adapters; save each one to its own file")
    if two:
        return "two_branch"
    if one:
        siglip_in = shapes.get("siglip_in.0.weight")
        hidden = shapes.get("ipa.0.to_q.weight", (0, 0))[1]
        if siglip_in is not None and hidden and tuple(siglip_in)[0] == hidden:
            # the authors' SigLIP-branch training module (flux_sig): its siglip_in is used, 768 -> hidden
            raise CheckpointError(
                "this is a single SigLIP-branch checkpoint from training (ipa.*, arcface_in.*, siglip_in.* with "
                f"siglip_in.0.weight {tuple(siglip_in)}): merge it with its ArcFace branch into the two-branch "
                "layout first (train/merge.py, as the authors' merge_ipa.py)")
        return "arcface_only"
    found = ", ".join(sorted(names)[:5]) or "no tensors"
    raise CheckpointError(
        "this is not a WithAnyone adapter: it has neither 'ipa_arc.0.to_q.weight' (WithAnyone, WithAnyone.K) nor "
        f"'ipa.0.to_q.weight' (WithAnyone.Ke) (first keys: {found}). Load withanyone.safetensors (or the Kontext "
        "adapters) from the WithAnyone release."
    )


_K_NAME = re.compile(r"(kontext|(^|[^a-z0-9])k([^a-z0-9]|$))", re.IGNORECASE)
_KE_NAME = re.compile(r"(^|[^a-z0-9])ke([^a-z0-9]|$)|edit", re.IGNORECASE)


def infer_adapter_variant(layout: str, metadata: Mapping[str, str] | None = None, name: str | None = None) -> str:
    """The release a file is: ``base``, ``k`` or ``ke``.

    The ArcFace-only layout is WithAnyone.Ke. The two-branch layout is the base adapter or
    WithAnyone.K, which the keys cannot tell apart: the file's metadata (``withanyone_variant``)
    decides, else a file name that says Kontext or K (``withanyone_kontext.safetensors``,
    ``WithAnyone.K.safetensors``) means K. Both run the same code, so the guess only changes
    what is reported.
    """
    declared = (metadata or {}).get(VARIANT_METADATA_KEY)
    if declared is not None:
        declared = declared.strip().lower()
        if declared not in ADAPTER_VARIANTS:
            raise CheckpointError(f"the file's metadata names an unknown variant {declared!r} "
                                  f"(known: {', '.join(ADAPTER_VARIANTS)})")
        if ADAPTER_VARIANTS[declared]["layout"] != layout:
            raise CheckpointError(f"the file's metadata says {ADAPTER_VARIANTS[declared]['title']}, but its keys "
                                  f"have the {layout} layout")
        return declared
    if layout == "arcface_only":
        return "ke"
    stem = Path(name).stem if name else ""
    if stem and _K_NAME.search(stem) and not _KE_NAME.search(stem):
        return "k"
    return "base"


def infer_adapter_config(shapes: Mapping[str, tuple[int, ...]], variant: str | None = None) -> AdapterConfig:
    """Infer an :class:`AdapterConfig` from adapter tensor shapes (either official key layout).

    The split between double and single blocks is not visible in the weights; it is
    taken from the standard FLUX ratio (19 + 38 = 57 blocks) when the count matches,
    else it must be given by the caller via ``num_double_blocks``. ``variant`` (default:
    from the keys, see :func:`infer_adapter_variant`) must fit the key layout.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    layout = detect_adapter_layout(shapes)
    variant = variant or infer_adapter_variant(layout)
    if variant not in ADAPTER_VARIANTS:
        raise CheckpointError(f"unknown adapter variant {variant!r}: use one of {', '.join(ADAPTER_VARIANTS)}")
    if ADAPTER_VARIANTS[variant]["layout"] != layout:
        raise CheckpointError(f"{ADAPTER_VARIANTS[variant]['title']} has the {ADAPTER_VARIANTS[variant]['layout']} "
                              f"key layout, but these keys have the {layout} layout")
    if layout == "arcface_only":
        return _arcface_only_config(shapes, variant)
    if "ipa_arc.0.to_q.weight" not in shapes:
        raise CheckpointError("the two-branch adapter has no 'ipa_arc.0.to_q.weight': the file is incomplete")
    inner, hidden = shapes["ipa_arc.0.to_q.weight"]
    block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"ipa_arc\.(\d+)\.", k))}
    num_blocks = max(block_ids) + 1
    head_dim = 64
    if inner % head_dim:
        raise CheckpointError(f"adapter inner size {inner} is not a multiple of the head size {head_dim}")
    num_double = 19 if num_blocks == 57 else None
    arc_out = shapes.get("arcface_in_arc.3.weight", (ARC_TOKENS * hidden,))[0]
    return AdapterConfig(
        hidden_size=hidden,
        num_heads=inner // head_dim,
        num_double_blocks=num_double if num_double is not None else num_blocks,
        num_single_blocks=num_blocks - num_double if num_double is not None else 0,
        head_dim=head_dim,
        arcface_dim=shapes.get("arcface_in_arc.0.weight", (0, 512))[1],
        siglip_dim=shapes.get("siglip_in_sig.0.weight", (0, 768))[1],
        arc_tokens=arc_out // hidden,
        variant=variant,
    )


def _arcface_only_config(shapes: Mapping[str, tuple[int, ...]], variant: str) -> AdapterConfig:
    if "ipa.0.to_q.weight" not in shapes:
        raise CheckpointError("the ArcFace-only adapter has no 'ipa.0.to_q.weight': the file is incomplete")
    inner, hidden = shapes["ipa.0.to_q.weight"]
    head_dim = 64
    if inner % head_dim:
        raise CheckpointError(f"adapter inner size {inner} is not a multiple of the head size {head_dim}")
    num_blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"ipa\.(\d+)\.", k)))
    num_double = 19 if num_blocks == 57 else num_blocks
    arc_out = shapes.get("arcface_in.3.weight", (ARC_TOKENS * hidden,))[0]
    return AdapterConfig(
        hidden_size=hidden, num_heads=inner // head_dim, num_double_blocks=num_double,
        num_single_blocks=num_blocks - num_double, head_dim=head_dim,
        arcface_dim=shapes.get("arcface_in.0.weight", (0, 512))[1], arc_tokens=arc_out // hidden, variant=variant,
    )


def _describe_flux(config: AdapterConfig) -> str:
    if config.hidden_size == 3072 and config.num_blocks == 57:
        return "FLUX.1 Kontext (dev)" if config.variant in ("k", "ke") else "FLUX.1 (dev/schnell)"
    return f"a FLUX model with hidden size {config.hidden_size} and {config.num_blocks} blocks"


def check_adapter_state(state: Mapping[str, object], adapter: IdentityAdapter, source: str = "checkpoint") -> None:
    """Raise a :class:`CheckpointError` naming missing/unexpected keys and wrong shapes."""
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if wrong:
        details = ", ".join(f"{k} {got[k]} (expected {expected[k]})" for k in wrong[:4])
        problems.append(f"{len(wrong)} tensors with the wrong shape: {details}")
    if problems:
        try:
            made_for = _describe_flux(infer_adapter_config(got))
        except (CheckpointError, ValueError):
            made_for = "an unknown model"
        raise CheckpointError(
            f"{source} does not fit this adapter ({adapter.config.describe()}, i.e. "
            f"{_describe_flux(adapter.config)}): " + "; ".join(problems)
            + f". The file looks made for {made_for}; use the adapter that matches your FLUX model."
        )


FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, name))


def norm_dtype_for(dtype: torch.dtype | None) -> torch.dtype | None:
    """Storage dtype of LayerNorm weights and biases: never fp8 (they are tiny and run in float32)."""
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}


class _LazyAdapterFile(Mapping):
    """A safetensors file seen as a mapping of its (prefix-stripped) keys, read one tensor at a time.

    Tensors are read with plain file reads, not through a memory map: mapped pages count in the
    process's resident memory until the map is closed, so reading a 5.6 GB release through one would
    peak at the file plus the converted copy.
    """

    def __init__(self, path: Path):
        import json
        import struct

        self._path = path
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = {}
        for name, entry in header.items():
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path.name}: tensor {name} has dtype {entry['dtype']}, which is not supported")
            key = strip_wrapper_prefixes({name: None}).popitem()[0]
            self._entries.setdefault(key, entry)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"]) for k, e in self._entries.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with open(self._path, "rb") as fh:
            fh.seek(self._data_start + start)
            if fh.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self._path.name} is truncated (tensor {key}); re-download it")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class _ShapeOnly:
    """Stands in for a tensor where only its shape is needed (key checks before reading)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def load_adapter(
    path_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
    config: AdapterConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    num_double_blocks: int | None = None,
    operations=None,
    variant: str | None = None,
    transform=None,
) -> IdentityAdapter:
    """Build an :class:`IdentityAdapter` from a safetensors file (or a state dict).

    The config is inferred from the shapes unless given. The double/single split is
    read from the file's metadata or its FLUX keys when present, else FLUX.1's 19 + 38
    is recognised; ``num_double_blocks`` overrides it. Files that also hold FLUX
    weights (as the reference saves them) are accepted.

    ``dtype`` is the storage dtype of the linear layers (None: as in the file); with an
    fp8 dtype the LayerNorms are kept in bf16. ``operations`` are the layer classes (see
    :data:`withanyone_core.adapter.TORCH_OPERATIONS`). ``transform(key, tensor)`` may rewrite
    each non-norm tensor as it is read, before the dtype cast. A file is read tensor by tensor and
    each tensor is converted as it is read, so peak memory is about one copy of the
    adapter, not the file plus a converted copy.

    The key layout picks the class (:class:`IdentityAdapter` for the two-branch layout,
    :class:`~withanyone_core.adapter.ArcFaceOnlyAdapter` for WithAnyone.Ke); ``variant``
    (``base``, ``k``, ``ke``; default: from the keys, the metadata and the file name, see
    :func:`infer_adapter_variant`) is recorded in ``adapter.config.variant`` and logged. The
    Kontext module's unused ``siglip_in.*`` is dropped with a log line.
    """
    metadata: dict[str, str] = {}
    if isinstance(path_or_state, Mapping):
        state, source = strip_wrapper_prefixes(dict(path_or_state)), "state dict"
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    else:
        path = _check_safetensors_path(path_or_state)
        source = path.name
        try:
            state = _LazyAdapterFile(path)
            shapes = state.shapes()
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{source} could not be read as safetensors ({exc}); the file may be truncated") from exc
        metadata = read_safetensors_metadata(path)
    if num_double_blocks is None:
        num_double_blocks = _double_block_count(shapes, metadata)
    shapes = adapter_keys(shapes)
    layout = detect_adapter_layout(shapes)
    if layout == "arcface_only":
        unused = sorted(k for k in shapes if k.startswith(UNUSED_ARCFACE_ONLY_PREFIXES))
        if unused:
            logger.info("%s: ignoring %d siglip_in.* tensors (the Kontext adapter defines them but its ArcFace-only "
                        "path never reads them)", source, len(unused))
            shapes = {k: v for k, v in shapes.items() if k not in unused}
    if variant is None and config is None:
        variant = infer_adapter_variant(layout, metadata, None if isinstance(path_or_state, Mapping) else source)
    if config is None:
        config = infer_adapter_config(shapes, variant)
        if num_double_blocks is not None:
            config = AdapterConfig(
                **{
                    **config.to_dict(),
                    "num_double_blocks": num_double_blocks,
                    "num_single_blocks": config.num_blocks - num_double_blocks,
                }
            )
    elif variant is not None and variant != config.variant:
        config = AdapterConfig(**{**config.to_dict(), "variant": variant})
    with torch.device("meta"):
        adapter = adapter_for_config(config, operations=operations)
    check_adapter_state({k: _ShapeOnly(v) for k, v in shapes.items()}, adapter, source)
    norm_dtype = norm_dtype_for(dtype)
    norm_keys = {f"{name}.{p}" for name, module in adapter.named_modules()
                 if isinstance(module, torch.nn.LayerNorm) for p in ("weight", "bias")}
    loaded = {}
    for key in shapes:
        tensor = state[key]
        if transform is not None and key not in norm_keys:
            tensor = transform(key, tensor)  # e.g. per-tensor scaling before an fp8 cast
        target = norm_dtype if key in norm_keys else dtype
        loaded[key] = tensor.to(device=device, dtype=target or tensor.dtype)
        del tensor
    adapter.load_state_dict(loaded, strict=True, assign=True)
    del loaded
    logger.info("loaded WithAnyone adapter from %s: %s (%s layout; %s, weights %s)", source, config.title,
                config.layout.replace("_", "-"), config.describe(),
                str(dtype or adapter.weight_dtype).replace("torch.", ""))
    return adapter


def _double_block_count(state: Mapping[str, object], metadata: Mapping[str, str]) -> int | None:
    """How many adapter blocks follow FLUX double blocks, when the file says so.

    Files written by :func:`save_adapter` record it in their metadata; files that also
    hold the FLUX weights (as the reference saves them) show it by their keys.
    """
    if "num_double_blocks" in metadata:
        return int(metadata["num_double_blocks"])
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("double_blocks.")}
    return max(doubles) + 1 if doubles else None


def save_adapter(adapter: IdentityAdapter, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save in the official key layout (loadable by :func:`load_adapter` and the ComfyUI loader)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    meta = {"format": "withanyone-adapter", "num_double_blocks": str(adapter.config.num_double_blocks),
            VARIANT_METADATA_KEY: adapter.config.variant}
    meta.update(metadata or {})
    save_file(state, str(path), metadata=meta)


# ----------------------------------------------------------------- BFL -> diffusers
_DOUBLE_SIMPLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_SIMPLE = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_TOP_SIMPLE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def _map_simple(name: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src + ".weight" or name == src + ".bias":
            return dst + name[len(src):]
        if name == src:  # RMSNorm scales carry no .weight suffix in BFL files
            return dst
    return None


def is_bfl_flux(state: Mapping[str, object]) -> bool:
    return any(k.startswith("double_blocks.") for k in state) and "img_in.weight" in state


def bfl_flux_config(state: Mapping[str, torch.Tensor]) -> dict:
    """diffusers ``FluxTransformer2DModel`` config for a BFL-layout FLUX state dict.

    The head count is not stored in the weights: FLUX uses heads of 128, found from
    the RMSNorm scale size of the query norm.
    """
    hidden = state["img_in.weight"].shape[0]
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks."))
    single = [int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")]
    return {
        "patch_size": 1,
        "in_channels": state["img_in.weight"].shape[1],
        "num_layers": depth,
        "num_single_layers": 1 + max(single) if single else 0,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": state["txt_in.weight"].shape[1],
        "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
    }


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a BFL-layout FLUX state dict to diffusers' ``FluxTransformer2DModel`` keys.

    Size-aware: fused qkv is split by the hidden size read from the weights, single
    block ``linear1`` into q, k, v and the MLP input; the final AdaLN's (shift, scale)
    halves are swapped to diffusers' (scale, shift). Non-FLUX keys (e.g. adapter
    weights in the same file) are ignored.
    """
    state = strip_wrapper_prefixes(state)
    if not is_bfl_flux(state):
        raise CheckpointError(
            "not a FLUX checkpoint in Black Forest Labs layout (no 'double_blocks.*' / 'img_in.weight'); "
            "use the original flux1-dev.safetensors or a diffusers folder"
        )
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state.items():
        if key.startswith(ADAPTER_PREFIXES):
            continue
        m = re.match(r"(double|single)_blocks\.(\d+)\.(.+)$", key)
        if m:
            kind, idx, rest = m.groups()
            if kind == "double":
                base = f"transformer_blocks.{idx}."
                qkv = re.match(r"(img|txt)_attn\.qkv\.(weight|bias)$", rest)
                if qkv:
                    names = ("to_q", "to_k", "to_v") if qkv.group(1) == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
                    for name, part in zip(names, torch.split(value, hidden, dim=0)):
                        out[f"{base}attn.{name}.{qkv.group(2)}"] = part
                    continue
                mapped = _map_simple(rest, _DOUBLE_SIMPLE)
            else:
                base = f"single_transformer_blocks.{idx}."
                lin1 = re.match(r"linear1\.(weight|bias)$", rest)
                if lin1:
                    mlp = value.shape[0] - 3 * hidden
                    parts = torch.split(value, [hidden, hidden, hidden, mlp], dim=0)
                    for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                        out[f"{base}{name}.{lin1.group(1)}"] = part
                    continue
                mapped = _map_simple(rest, _SINGLE_SIMPLE)
            if mapped is None:
                unused.append(key)
                continue
            out[base + mapped] = value
            continue
        ada = re.match(r"final_layer\.adaLN_modulation\.1\.(weight|bias)$", key)
        if ada:
            shift, scale = value.chunk(2, dim=0)
            out[f"norm_out.linear.{ada.group(1)}"] = torch.cat([scale, shift], dim=0)
            continue
        mapped = _map_simple(key, _TOP_SIMPLE)
        if mapped is None:
            unused.append(key)
            continue
        out[mapped] = value
    if unused:
        raise CheckpointError(f"unrecognised FLUX keys (not mapped to diffusers): {', '.join(sorted(unused)[:8])}")
    return out
