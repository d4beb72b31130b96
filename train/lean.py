"""Memory-lean training pieces (each an option; the authors' recipe is the default).

- :class:`FP8StorageLinear` / :func:`store_frozen_fp8`: the frozen FLUX blocks' linear layers keep
  their weights in float8 e4m3fn with one scale per tensor (the pack's adapter loader scales its
  fp8 storage the same way, so small weights use e4m3fn's normal range, not its subnormals) and
  cast them to the compute dtype on use. Backward recasts from the fp8 copy instead of keeping
  the cast weight alive, so a step holds at most one layer's compute-dtype weight at a time.
- :func:`build_optimizer`: AdamW (torch, the authors') or 8-bit AdamW (bitsandbytes,
  block-wise quantised states: 2 bytes per parameter instead of 8).
- :func:`add_adapter_lora` / :func:`merged_adapter_state`: the trained adapter branch learns
  through LoRA on its linear layers (peft); its base weights stay frozen in the frozen dtype,
  and every save merges ``W + scale * B @ A`` into a normal full adapter file in the official
  key layout.
- :func:`captions_of_run` / :class:`CachedText` / :func:`cache_and_release_text`: every caption
  the run can ask for (records, fixed prompts, the dropped caption "", the sample prompt) is
  encoded once, then T5 and CLIP leave memory; the run reads the cached embeddings.
- :func:`offload_idle_branch`: the adapter branch a one-branch run leaves off (weight 0, never
  run) stays in CPU memory; it is saved unchanged with the checkpoint.
"""

from __future__ import annotations

import gc
import logging
import re
import typing
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from train.config import OptimizerName
from withanyone_core.offline import settle_bitsandbytes, without_hub_kernels

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_STORAGE = {"fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None)}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 states for tensors smaller than this (its default)
BNB_BLOCK = 256  # bitsandbytes' block size of 8-bit optimizer states (one fp32 absmax per block)


# ------------------------------------------------------------------ fp8 storage
class _CastLinear(torch.autograd.Function):
    """``x @ (w8 * scale).T + b`` that saves the fp8 weight (not its cast copy) for backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        w = weight.to(x.dtype) * scale.to(x.dtype)
        ctx.save_for_backward(weight, scale)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        w = weight.to(grad.dtype) * scale.to(grad.dtype)
        return grad @ w, None, None, None


class FP8StorageLinear(nn.Module):
    """A frozen Linear stored as float8 e4m3fn ``weight / weight_scale``; computes in the input's
    dtype (the autocast dtype under autocast). Not trainable: it only replaces frozen layers."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = (
            (w.abs().amax().float().clamp(min=1e-12) / FP8_MAX)
            if w.device.type != "meta"
            else torch.ones((), device="meta")
        )
        self.weight = nn.Parameter(
            (w.float() / scale).to(storage)
            if w.device.type != "meta"
            else torch.empty(w.shape, dtype=storage, device="meta"),
            requires_grad=False,
        )
        self.register_buffer("weight_scale", scale.reshape(()).float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        elif not x.is_floating_point() or x.dtype in FP8_STORAGE.values():
            raise TypeError(f"FP8StorageLinear needs a float input, got {x.dtype}")
        return _CastLinear.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.weight.dtype}"


def store_frozen_fp8(transformer: nn.Module, storage: str = "fp8_e4m3fn") -> int:
    """Replace every ``nn.Linear`` inside the FLUX blocks by :class:`FP8StorageLinear`; returns how many.

    The embedders and the final projection outside the blocks stay as they are (small, and
    diffusers reads the model's dtype from its first parameter)."""
    dtype = FP8_STORAGE.get(storage)
    if dtype is None:
        raise ValueError(f"frozen storage {storage!r} is not available in this torch (choices: {list(FP8_STORAGE)})")
    if any(p.requires_grad for p in transformer.parameters()):
        raise ValueError("fp8 storage is for a frozen FLUX: freeze the transformer first (train.mode adapter)")
    count = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                if type(module) is nn.Linear:
                    parent_name, _, child = name.rpartition(".")
                    parent = block.get_submodule(parent_name) if parent_name else block
                    setattr(parent, child, FP8StorageLinear(module, dtype))
                    count += 1
    gc.collect()
    return count


# ------------------------------------------------------------------ optimizers
OPTIMIZERS = typing.get_args(OptimizerName)


def bitsandbytes():
    """bitsandbytes, imported without letting it reach the network."""
    try:
        with without_hub_kernels():
            import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "train.optimizer.name=adamw8bit needs bitsandbytes: pip install 'bitsandbytes>=0.50' "
            "(or pip install -r requirements-train.txt), or set train.optimizer.name=adamw"
        ) from exc
    return bnb


def peft():
    """peft, imported without letting it reach the network (it imports bitsandbytes when installed)."""
    settle_bitsandbytes()
    import peft as module

    return module


def build_optimizer(params: list[nn.Parameter], opt, lr: float) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters; ``opt.name`` chooses torch's or bitsandbytes' 8-bit one."""
    kwargs = dict(lr=lr, weight_decay=opt.weight_decay, betas=tuple(opt.betas), eps=opt.eps)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if opt.name == "adamw8bit":
        return bitsandbytes().optim.AdamW8bit(params, min_8bit_size=BNB_MIN_8BIT_SIZE, **kwargs)
    raise ValueError(f"train.optimizer.name must be one of {', '.join(OPTIMIZERS)}; got {opt.name!r}")


def optimizer_state_bytes(numels: Iterable[int], name: str) -> float:
    """Bytes of the optimizer states of parameters with these element counts (fp32 parameters).

    adamw: two fp32 states + a 4-byte step per tensor. adamw8bit (bitsandbytes): two uint8
    states + one fp32 absmax per 256-element block each, or two fp32 states below 4,096
    elements (its ``min_8bit_size``); the quantisation maps are shared by all tensors."""
    total = 0.0
    any_8bit = False
    for n in numels:
        if name == "adamw":
            total += 8 * n + 4
        elif name == "adamw8bit":
            if n >= BNB_MIN_8BIT_SIZE:
                any_8bit = True
                total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
            else:
                total += 8 * n
        else:
            raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    return total + (2 * 256 * 4 if any_8bit else 0)  # bitsandbytes' two 256-entry fp32 quantisation maps


# ------------------------------------------------------------------ adapter LoRA
def adapter_lora_pattern(prefixes: tuple[str, ...]) -> str:
    """A regex over adapter module names: every Linear of the branches with these key prefixes."""
    heads = "|".join(re.escape(p.rstrip(".")) for p in prefixes)
    return rf"^({heads})\.\d+(\.(to_q|to_kv|to_out))?$"


def add_adapter_lora(
    adapter: nn.Module, prefixes: tuple[str, ...], rank: int, alpha: float, frozen: torch.dtype
) -> list[nn.Parameter]:
    """LoRA (peft) on the linear layers of the branches ``prefixes``; base weights frozen in ``frozen``,
    LoRA weights fp32 master copies. Returns the LoRA parameters (the only trainable ones)."""
    LoraConfig, inject_adapter_in_model = peft().LoraConfig, peft().inject_adapter_in_model

    pattern = adapter_lora_pattern(prefixes)
    targets = [n for n, m in adapter.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if not targets:
        raise ValueError(f"no linear layer of the adapter branch ({', '.join(prefixes)}) to put LoRA on")
    for name in targets:
        adapter.get_submodule(name).to(frozen)
    exact = "^(" + "|".join(re.escape(t) for t in targets) + ")$"  # these layers and no other
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=exact, init_lora_weights=True), adapter)
    params = []
    for name, p in adapter.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
            params.append(p)
    return params


def has_adapter_lora(adapter: nn.Module) -> bool:
    return any(".lora_" in n for n, _ in adapter.named_parameters())


@torch.no_grad()
def merged_adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's state dict in the official key layout with each LoRA merged into its weight
    (``W + scaling * B @ A`` in fp32); layers without LoRA keep their dtype."""
    LoraLinear = peft().tuners.lora.Linear

    state: dict[str, torch.Tensor] = {}
    for name, module in adapter.named_modules():
        if isinstance(module, LoraLinear):
            base = module.base_layer
            weight = base.weight.detach().float().cpu()
            for key in module.active_adapters:
                a = module.lora_A[key].weight.detach().float().cpu()
                b = module.lora_B[key].weight.detach().float().cpu()
                weight = weight + module.scaling[key] * (b @ a)
            state[f"{name}.weight"] = weight.contiguous()
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach().cpu().contiguous()
    for key, tensor in adapter.state_dict().items():
        if ".lora_" in key or ".base_layer." in key:
            continue
        state[key] = tensor.detach().cpu().contiguous()
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
            raise ValueError(f"the merged adapter's {key} is not finite: the checkpoint is not written")
    return state


class MergedAdapterView:
    """What :func:`withanyone_core.checkpoints.adapter_files.save_adapter` needs (``config``, ``state_dict()``),
    with the LoRA merged: the saved file is a normal full adapter."""

    def __init__(self, adapter: nn.Module):
        self.config = adapter.config
        self._adapter = adapter

    def state_dict(self) -> dict[str, torch.Tensor]:
        return merged_adapter_state(self._adapter)


# ------------------------------------------------------------------ text encoders
def captions_of_run(config, manifest=None, max_persons: int = 4) -> list[str]:
    """Every caption the run can ask the text encoders for, in a fixed order.

    Records' own captions (caption phases), the fixed prompt for 1..max persons (fixed phases),
    "" (phases with text dropout) and the sample prompt (when sampling is on)."""
    from train.data.dataset import fixed_prompt

    wanted: dict[str, None] = {}
    persons = max_persons  # MultiID-2M photos (a stream or a mix) are not counted up front
    if manifest is not None and len(manifest):
        persons = max(persons, *(len(r.persons) for r in manifest.records))
    for phase in config.phases:
        if phase.text_dropout > 0:
            wanted[""] = None
        if phase.prompt_mode == "fixed":
            for n in range(1, persons + 1):
                wanted[fixed_prompt(phase.fixed_prompt, n)] = None
        elif manifest is not None:
            for record in manifest.records:
                wanted[record.caption] = None
    if config.sample.every:
        wanted[config.sample.prompt] = None
    return list(wanted)


class CachedText(nn.Module):
    """Stands in for the released :class:`train.models.TextEncoder`: the same call, answered from
    the embeddings cached before the encoders left memory."""

    def __init__(self, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], t5_length: int, device):
        super().__init__()
        self.embeddings = embeddings
        self.t5_length = t5_length
        self.device = torch.device(device)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in captions if c not in self.embeddings]
        if missing:
            raise RuntimeError(
                f"caption {missing[0]!r} was not cached before the text encoders were released "
                "(train.release_text_encoders): every caption must be known when the run starts"
            )
        t5 = torch.stack([self.embeddings[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([self.embeddings[c][1] for c in captions]).to(self.device)
        return t5, pooled


@torch.no_grad()
def cache_and_release_text(models, captions: list[str], device, disk_cache=None, batch: int = 8) -> CachedText:
    """Encode ``captions`` on ``device`` (or read them from ``disk_cache``), then drop T5 and CLIP from
    GPU and CPU memory; ``models.text`` becomes a :class:`CachedText`. The embeddings stay in CPU memory
    (T5's 512 x 4096 bf16 sequence: 4 MB per caption)."""
    text = models.text
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    todo = []
    for caption in captions:
        cached = disk_cache.get(caption) if disk_cache is not None else None
        if cached is not None:
            embeddings[caption] = (cached["t5"], cached["pooled"])
        else:
            todo.append(caption)
    if todo:
        text.to(device)
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            t5, pooled = text(chunk)
            for caption, t, p in zip(chunk, t5.cpu(), pooled.cpu()):
                if not (torch.isfinite(t.float()).all() and torch.isfinite(p.float()).all()):
                    raise RuntimeError(f"the text encoders gave non-finite embeddings for {caption!r}")
                embeddings[caption] = (t.clone(), p.clone())
                if disk_cache is not None:
                    disk_cache.put(caption, {"t5": t, "pooled": p})
    cached = CachedText(embeddings, text.t5_length, device)
    models.text = cached
    del text
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info(
        "text encoders released after caching %d caption(s) (%d encoded, %d from the cache folder)",
        len(captions),
        len(todo),
        len(captions) - len(todo),
    )
    return cached


# ------------------------------------------------------------------ idle adapter branch
IDLE_MODULES = {"arcface": ("ipa_sig", "siglip_in_sig", "arcface_in_sig"), "siglip": ("ipa_arc",), "both": ()}


def offload_idle_branch(adapter: nn.Module, branch: str) -> int:
    """Move the modules a one-branch run never runs (its weight is 0) to the CPU; returns their bytes."""
    moved = 0
    for name in IDLE_MODULES[branch]:
        module = getattr(adapter, name)
        module.to("cpu")
        moved += sum(p.numel() * p.element_size() for p in module.parameters())
    return moved
