"""Crash-safe checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint is written into ``.tmp-step-<N>`` and renamed into place only after every
file (and a ``COMPLETE`` marker naming them) is on disk, so a kill -9 at any moment
leaves either the previous checkpoints or a temp folder that resume ignores and removes.

Contents: ``withanyone.safetensors`` (the adapter, official key layout, loads in the
ComfyUI adapter loader; with ``train.adapter_lora`` its LoRA merged in), ``lora.safetensors`` when LoRA trains (keys ComfyUI's LoRA
loader applies to FLUX: ``transformer.<diffusers module>.lora_A/lora_B.weight`` and
``.alpha``), ``accelerate/`` (model, optimizer, RNG states of every rank)
and ``trainer.json`` (global step, phase, data position).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from withanyone_core.checkpoints import save_adapter

from .lean import MergedAdapterView, has_adapter_lora

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str | Path) -> None:
    root = Path(output_dir) / "checkpoints"
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-") or (_STEP_DIR.match(child.name) and not (child / MARKER).is_file()):
                logger.info("removing incomplete checkpoint %s (left by an interrupted save)", child.name)
                shutil.rmtree(child, ignore_errors=True)


def lora_state_for_comfyui(transformer: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """peft LoRA weights of a diffusers FLUX as ``transformer.<module>.lora_{A,B}.weight`` + ``.alpha``."""
    state = {}
    for name, param in transformer.named_parameters():
        m = re.match(r"(.+)\.lora_([AB])\.default\.weight$", name)
        if not m:
            continue
        module = m.group(1).replace(".base_layer", "")
        state[f"transformer.{module}.lora_{m.group(2)}.weight"] = param.detach().float().cpu().contiguous()
        state[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    return state


def save_checkpoint(accelerator, output_dir: str | Path, step: int, models, trainer_state: dict,
                    lora_alpha: float | None, keep: int, adapter_metadata: dict | None = None) -> Path | None:
    """Write checkpoint ``step`` atomically on every rank; returns its folder (main process)."""
    from safetensors.torch import save_file

    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "accelerate").mkdir(parents=True)  # other ranks write their RNG states into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))  # every rank writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter = accelerator.unwrap_model(models.denoiser).adapter
        if has_adapter_lora(adapter):  # train.adapter_lora: the LoRA merged, a normal full adapter file
            adapter = MergedAdapterView(adapter)
        save_adapter(adapter, tmp / "withanyone.safetensors", metadata={"step": str(step), **(adapter_metadata or {})})
        files = ["withanyone.safetensors", "accelerate", "trainer.json"]
        if lora_alpha is not None:
            transformer = accelerator.unwrap_model(models.denoiser).transformer
            save_file(lora_state_for_comfyui(transformer, lora_alpha), str(tmp / "lora.safetensors"),
                      metadata={"format": "withanyone-lora", "step": str(step)})
            files.append("lora.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(root)
        for old_step, folder in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed old checkpoint step-%d (keeping the last %d)", old_step, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def load_checkpoint(accelerator, folder: Path) -> dict:
    accelerator.load_state(str(folder / "accelerate"))
    return json.loads((folder / "trainer.json").read_text())
