"""Reading safetensors files safely.

Only safetensors are read: pickled ``.pt``/``.bin``/``.ckpt`` files can run code when loaded
and are refused with a message saying how to convert them. Keys saved through a wrapper
(``module.``, ``model.diffusion_model.``...) are unwrapped by :func:`strip_wrapper_prefixes`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

_WRAPPER_PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "_orig_mod.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying what to do."""


def check_safetensors_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it is an existing safetensors file, else a :class:`CheckpointError` saying why."""
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

    path = check_safetensors_path(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path.name} could not be read as safetensors ({exc}); the file may be truncated"
        ) from exc


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file without loading its data."""
    from safetensors import safe_open

    path = check_safetensors_path(path)
    with safe_open(str(path), framework="pt") as fh:
        return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty if none)."""
    from safetensors import safe_open

    with safe_open(str(check_safetensors_path(path)), framework="pt") as fh:
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
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    **{
        name: getattr(torch, attr)
        for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
        if hasattr(torch, attr)
    },
}


class LazySafetensorsFile(Mapping):
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
