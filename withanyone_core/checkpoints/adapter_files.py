"""WithAnyone adapter files: key layouts, size and variant inference, loading and saving.

The identity adapter is recognised in the official key layouts: two-branch (``ipa_arc.N.*``,
``ipa_sig.N.*``, ``arcface_in_arc.*``, ``arcface_in_sig.*``, ``siglip_in_sig.*``: WithAnyone on
FLUX.1, and WithAnyone.K) and ArcFace-only (``ipa.N.*``, ``arcface_in.*``, an unused
``siglip_in.*`` optional: WithAnyone.Ke on FLUX.1 Kontext); its size is inferred from the tensor
shapes, its variant from the keys (K from a name or metadata, see :func:`infer_adapter_variant`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..adapter import ADAPTER_VARIANTS, ARC_TOKENS, AdapterConfig, IdentityAdapterBase, adapter_for_config
from .reading import (
    CheckpointError,
    LazySafetensorsFile,
    check_safetensors_path,
    read_safetensors_metadata,
    strip_wrapper_prefixes,
)

logger = logging.getLogger(__name__)

TWO_BRANCH_PREFIXES = ("ipa_arc.", "ipa_sig.", "arcface_in_arc.", "arcface_in_sig.", "siglip_in_sig.")
ARCFACE_ONLY_PREFIXES = ("ipa.", "arcface_in.", "siglip_in.")
ADAPTER_PREFIXES = TWO_BRANCH_PREFIXES + ARCFACE_ONLY_PREFIXES
# the Kontext module's SigLIP projector: defined, never read by its ArcFace-only path
UNUSED_ARCFACE_ONLY_PREFIXES = ("siglip_in.",)
VARIANT_METADATA_KEY = "withanyone_variant"


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
            "arcface_in.*) of WithAnyone.Ke: it holds two adapters; save each one to its own file"
        )
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
                "layout first (train/merge.py, as the authors' merge_ipa.py)"
            )
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
            raise CheckpointError(
                f"the file's metadata names an unknown variant {declared!r} (known: {', '.join(ADAPTER_VARIANTS)})"
            )
        if ADAPTER_VARIANTS[declared]["layout"] != layout:
            raise CheckpointError(
                f"the file's metadata says {ADAPTER_VARIANTS[declared]['title']}, but its keys have the {layout} layout"
            )
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
        raise CheckpointError(
            f"{ADAPTER_VARIANTS[variant]['title']} has the {ADAPTER_VARIANTS[variant]['layout']} "
            f"key layout, but these keys have the {layout} layout"
        )
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
        hidden_size=hidden,
        num_heads=inner // head_dim,
        num_double_blocks=num_double,
        num_single_blocks=num_blocks - num_double,
        head_dim=head_dim,
        arcface_dim=shapes.get("arcface_in.0.weight", (0, 512))[1],
        arc_tokens=arc_out // hidden,
        variant=variant,
    )


def _describe_flux(config: AdapterConfig) -> str:
    if config.hidden_size == 3072 and config.num_blocks == 57:
        return "FLUX.1 Kontext (dev)" if config.variant in ("k", "ke") else "FLUX.1 (dev/schnell)"
    return f"a FLUX model with hidden size {config.hidden_size} and {config.num_blocks} blocks"


def check_adapter_state(state: Mapping[str, object], adapter: IdentityAdapterBase, source: str = "checkpoint") -> None:
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
            f"{_describe_flux(adapter.config)}): "
            + "; ".join(problems)
            + f". The file looks made for {made_for}; use the adapter that matches your FLUX model."
        )


FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, name)
)


def norm_dtype_for(dtype: torch.dtype | None) -> torch.dtype | None:
    """Storage dtype of LayerNorm weights and biases: never fp8 (they are tiny and run in float32)."""
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


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
) -> IdentityAdapterBase:
    """Build an identity adapter from a safetensors file (or a state dict).

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
        path = check_safetensors_path(path_or_state)
        source = path.name
        try:
            state = LazySafetensorsFile(path)
            shapes = state.shapes()
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"{source} could not be read as safetensors ({exc}); the file may be truncated"
            ) from exc
        metadata = read_safetensors_metadata(path)
    if num_double_blocks is None:
        num_double_blocks = _double_block_count(shapes, metadata)
    shapes = adapter_keys(shapes)
    layout = detect_adapter_layout(shapes)
    if layout == "arcface_only":
        unused = sorted(k for k in shapes if k.startswith(UNUSED_ARCFACE_ONLY_PREFIXES))
        if unused:
            logger.info(
                "%s: ignoring %d siglip_in.* tensors (the Kontext adapter defines them but its ArcFace-only "
                "path never reads them)",
                source,
                len(unused),
            )
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
    norm_keys = {
        f"{name}.{p}"
        for name, module in adapter.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for p in ("weight", "bias")
    }
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
    logger.info(
        "loaded WithAnyone adapter from %s: %s (%s layout; %s, weights %s)",
        source,
        config.title,
        config.layout.replace("_", "-"),
        config.describe(),
        str(dtype or adapter.weight_dtype).replace("torch.", ""),
    )
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


def save_adapter(
    adapter: IdentityAdapterBase, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save in the official key layout (loadable by :func:`load_adapter` and the ComfyUI loader)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    meta = {
        "format": "withanyone-adapter",
        "num_double_blocks": str(adapter.config.num_double_blocks),
        VARIANT_METADATA_KEY: adapter.config.variant,
    }
    meta.update(metadata or {})
    save_file(state, str(path), metadata=meta)
