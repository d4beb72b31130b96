"""Cached text-encoder outputs, safe to share between the processes of one run."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import torch


class TextEmbeddingCache:
    """Optional cache of text-encoder outputs, one safetensors file per caption hash.

    Every process may write the same caption at the same moment: each writes its own
    temporary file (process id + random suffix) and renames it into place, so the last
    rename wins with identical content and no process ever loses its file.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, caption: str) -> Path:
        return self.folder / (hashlib.sha1(caption.encode("utf-8")).hexdigest() + ".safetensors")

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        path = self._path(caption)
        if not path.is_file():
            return None
        from withanyone_core.checkpoints.reading import load_safetensors

        return load_safetensors(path)

    def put(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(caption)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
