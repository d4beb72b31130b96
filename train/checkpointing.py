"""Crash-safe checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint is written into ``.tmp-step-<N>`` and renamed into place only after every
file (and a ``COMPLETE`` marker naming them) is on disk, so a kill -9 at any moment
leaves either the previous checkpoints or a temp folder that resume ignores and removes.

Contents: ``withanyone.safetensors`` (the adapter, official key layout, loads in the
ComfyUI adapter loader; with ``train.adapter_lora`` its LoRA merged in), ``lora.safetensors`` when LoRA trains (keys ComfyUI's LoRA
loader applies to FLUX: ``transformer.<diffusers module>.lora_A/lora_B.weight`` and
``.alpha``), ``accelerate/`` (model, optimizer, RNG states of every rank)
and ``trainer.json`` (global step, phase, data position). The marker records every file's
size; no tensor is written unless every trainable weight and optimizer state is finite.

On resume (:func:`choose_resume_checkpoint`) the newest checkpoint is verified: every file
present at its recorded size, loadable, every tensor finite. A damaged one is renamed
``step-<N>.damaged`` (kept, never pruned) and the next older one is tried.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from withanyone_core.checkpoints.adapter_files import save_adapter

from .lean import MergedAdapterView, has_adapter_lora

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_DAMAGED_DIR = re.compile(r"^step-(\d+)\.damaged(-\d+)?$")
MARKER = "COMPLETE"
TRAINER_KEYS = ("step", "phase", "phase_name", "sampler")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message is one line saying what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint folder whose files are missing, truncated, unreadable or not finite."""


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in named:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not _all_finite(tensor):
            return name
    return None


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    if tensor.element_size() > 1:
        return bool(torch.isfinite(tensor).all())
    # fp8 (e.g. train.frozen_storage): torch has no isfinite for it; upcast a slice at a time, not the whole
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk].float()).all()) for i in range(0, flat.numel(), chunk))


def _nested_tensors(obj: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _nested_tensors(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _nested_tensors(value, f"{where}[{i}]")


def checkpoint_tensors(accelerator, models, optimizer=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint writes that training changes: the adapter file's tensors (official keys),
    every trainable weight of the denoiser (LoRA, full FLUX) and the optimizer's state."""
    denoiser = accelerator.unwrap_model(models.denoiser)
    for key, value in denoiser.adapter.state_dict().items():
        yield f"withanyone.safetensors {key}", value
    names = {}
    for name, param in denoiser.named_parameters():
        names[id(param)] = name
        if param.requires_grad and not name.startswith("adapter."):
            yield f"weight {name}", param
    inner = getattr(optimizer, "optimizer", optimizer)
    state = getattr(inner, "state", None)
    if isinstance(state, dict):
        for param, values in state.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    yield f"optimizer state {key} of {names.get(id(param), 'a parameter')}", value


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
    """(step, folder) of every complete checkpoint, oldest first (``step-<N>.damaged`` folders are not)."""
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


def damaged_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``step-<N>.damaged`` folders put aside by earlier resumes."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if _DAMAGED_DIR.match(p.name)) if root.is_dir() else []


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


def _refuse_nonfinite(accelerator, models, optimizer, step: int, output_dir: str | Path) -> None:
    """Every rank checks what it would write and all agree, so none waits at a barrier for one that stopped."""
    bad = first_nonfinite(checkpoint_tensors(accelerator, models, optimizer))
    flag = torch.tensor([0.0 if bad is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if float(flag.item()) > 0:
        where = f"{bad} is" if bad is not None else "a tensor on another process is"
        raise CheckpointError(
            f"checkpoint step-{step} not written: {where} not finite (NaN or infinity); the newest checkpoint in "
            f"{Path(output_dir) / 'checkpoints'} is untouched. Lower the learning rate or keep gradient clipping on "
            "(train.optimizer.max_grad_norm) and rerun to resume from it"
        )


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    models,
    trainer_state: dict,
    lora_alpha: float | None,
    keep: int,
    adapter_metadata: dict | None = None,
    optimizer=None,
) -> Path | None:
    """Write checkpoint ``step`` atomically on every rank; returns its folder (main process).

    Refuses (:class:`CheckpointError`, on every rank, before writing anything) when a trainable weight,
    an adapter tensor or the optimizer's state is not finite, or ``trainer_state`` holds a NaN."""
    from safetensors.torch import save_file

    try:
        trainer_json = json.dumps(trainer_state, indent=1, allow_nan=False)
    except ValueError as exc:
        raise CheckpointError(
            f"checkpoint step-{step} not written: its trainer state holds a non-finite number ({exc})"
        ) from exc
    _refuse_nonfinite(accelerator, models, optimizer, step, output_dir)
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
            save_file(
                lora_state_for_comfyui(transformer, lora_alpha),
                str(tmp / "lora.safetensors"),
                metadata={"format": "withanyone-lora", "step": str(step)},
            )
            files.append("lora.safetensors")
        (tmp / "trainer.json").write_text(trainer_json)
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files, "sizes": sizes}))
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
    """Load a verified checkpoint; one that does not fit the models of this run says so in one line."""
    try:
        accelerator.load_state(str(folder / "accelerate"))
    except Exception as exc:  # verified files that do not load: the run's models differ from the checkpoint's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {folder} is intact but does not fit this run's models ({type(exc).__name__}: {first}); "
            "resume with the config it was written with (train.mode, train.branch, train.lora, models.*) "
            "or use a new output_dir"
        ) from exc
    return json.loads((folder / "trainer.json").read_text())


# ---------------------------------------------------------------------------- verification on resume
def _check_safetensors(path: Path, rel: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if first_nonfinite([(key, fh.get_tensor(key))]) is not None:
                    raise DamagedCheckpoint(f"{rel}: tensor {key} is not finite")
    except DamagedCheckpoint:
        raise
    except Exception as exc:  # safetensors' own error types
        raise DamagedCheckpoint(f"{rel} is not readable ({type(exc).__name__}: {_first_line(exc)})") from exc


def _check_torch_file(path: Path, rel: str) -> None:
    from accelerate.utils import load  # accelerate's own reader: weights only, numpy RNG states allowed

    try:
        obj = load(str(path), map_location="cpu", mmap=path.suffix == ".bin")
    except Exception as exc:  # a truncated zip or pickle: RuntimeError, EOFError, UnpicklingError, ...
        raise DamagedCheckpoint(f"{rel} is not readable ({type(exc).__name__}: {_first_line(exc)})") from exc
    bad = first_nonfinite(_nested_tensors(obj, ""))
    if bad is not None:
        raise DamagedCheckpoint(f"{rel}: tensor {bad} is not finite")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _read_json(path: Path, rel: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedCheckpoint(f"{rel} is not valid JSON ({_first_line(exc)})") from exc


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`DamagedCheckpoint` (the reason, one line) unless every file of the checkpoint is present
    at the size it was written with, loadable, and every tensor in it is finite."""
    m = _STEP_DIR.match(folder.name)
    step = int(m.group(1)) if m else None
    marker = _read_json(folder / MARKER, MARKER)
    if not isinstance(marker, dict) or marker.get("step") != step or not isinstance(marker.get("files"), list):
        raise DamagedCheckpoint(f"{MARKER} does not describe step {step}")
    for name in marker["files"]:
        if not (folder / str(name)).exists():
            raise DamagedCheckpoint(f"{name} is missing")
    sizes = marker.get("sizes")
    if sizes is not None:  # written since sizes were recorded: truncation shows without reading anything
        if not isinstance(sizes, dict):
            raise DamagedCheckpoint(f"{MARKER} has no valid file sizes")
        for rel, size in sizes.items():
            path = folder / rel
            if not path.is_file():
                raise DamagedCheckpoint(f"{rel} is missing")
            if path.stat().st_size != size:
                raise DamagedCheckpoint(
                    f"{rel} is {path.stat().st_size} bytes, written as {size} (truncated or altered)"
                )
    state = _read_json(folder / "trainer.json", "trainer.json")
    if not isinstance(state, dict) or any(k not in state for k in TRAINER_KEYS):
        raise DamagedCheckpoint(
            f"trainer.json lacks {', '.join(k for k in TRAINER_KEYS if not isinstance(state, dict) or k not in state)}"
        )
    if state["step"] != step:
        raise DamagedCheckpoint(f"trainer.json says step {state['step']!r}, the folder step {step}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            _check_safetensors(path, rel)
        elif path.parent.name == "accelerate" and path.suffix in (".bin", ".pkl"):
            _check_torch_file(path, rel)


def _set_aside(folder: Path) -> Path:
    target = folder.with_name(folder.name + ".damaged")
    n = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}.damaged-{n}")
        n += 1
    os.replace(folder, target)
    return target


def choose_resume_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    """The newest checkpoint that verifies (main process only). Damaged ones, newest first, are renamed
    ``step-<N>.damaged`` with a warning; None when the run has no checkpoint at all. A run whose every
    checkpoint is damaged raises :class:`CheckpointError` (it never starts over from scratch)."""
    damaged = []
    for step, folder in reversed(complete_checkpoints(output_dir)):
        logger.info("verifying checkpoint %s", folder)
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint as exc:
            aside = _set_aside(folder)
            damaged.append(f"{folder.name} ({exc})")
            logger.warning(
                "checkpoint %s is damaged: %s; kept aside as %s (not deleted); trying the next older one",
                folder,
                exc,
                aside.name,
            )
            continue
        return step, folder
    earlier = [p.name for p in damaged_checkpoints(output_dir)]
    if damaged or earlier:
        root = Path(output_dir) / "checkpoints"
        what = (
            f"{'; '.join(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged (kept as step-<N>.damaged)"
            if damaged
            else f"only damaged ones, set aside by an earlier resume ({', '.join(earlier)})"
        )
        raise CheckpointError(
            f"no usable checkpoint in {root}: {what}. To go on, copy an intact step-<N> folder back into {root}; "
            f"to start this run over, move {root} away (or use a new output_dir)"
        )
    return None
