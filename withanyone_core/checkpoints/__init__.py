"""Safe checkpoint loading and key maps, in three rooms that import only downwards:

- :mod:`.reading`: safetensors only (pickles are refused with how to convert them), headers,
  metadata, wrapper prefixes, a tensor-at-a-time file reader;
- :mod:`.adapter_files`: the WithAnyone adapter's key layouts, size and variant inference,
  :func:`load_adapter` / :func:`save_adapter` (uses :mod:`.reading`);
- :mod:`.flux_keys`: FLUX checkpoints in Black Forest Labs' layout mapped to diffusers'
  ``FluxTransformer2DModel`` names for any hidden size (uses both).

The names below are the public API (``from withanyone_core.checkpoints import load_adapter``);
code inside this project imports from the room that defines a name.
"""

from .adapter_files import (
    ADAPTER_PREFIXES,
    ARCFACE_ONLY_PREFIXES,
    FP8_DTYPES,
    TWO_BRANCH_PREFIXES,
    UNUSED_ARCFACE_ONLY_PREFIXES,
    VARIANT_METADATA_KEY,
    adapter_keys,
    check_adapter_state,
    detect_adapter_layout,
    infer_adapter_config,
    infer_adapter_variant,
    load_adapter,
    norm_dtype_for,
    save_adapter,
)
from .flux_keys import bfl_flux_config, bfl_to_diffusers, is_bfl_flux
from .reading import (
    CheckpointError,
    load_safetensors,
    read_safetensors_metadata,
    read_safetensors_shapes,
    strip_wrapper_prefixes,
)

__all__ = [
    "ADAPTER_PREFIXES",
    "ARCFACE_ONLY_PREFIXES",
    "FP8_DTYPES",
    "TWO_BRANCH_PREFIXES",
    "UNUSED_ARCFACE_ONLY_PREFIXES",
    "VARIANT_METADATA_KEY",
    "CheckpointError",
    "adapter_keys",
    "bfl_flux_config",
    "bfl_to_diffusers",
    "check_adapter_state",
    "detect_adapter_layout",
    "infer_adapter_config",
    "infer_adapter_variant",
    "is_bfl_flux",
    "load_adapter",
    "load_safetensors",
    "norm_dtype_for",
    "read_safetensors_metadata",
    "read_safetensors_shapes",
    "save_adapter",
    "strip_wrapper_prefixes",
]
