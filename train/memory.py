"""Per-GPU training memory: what the weights, gradients, optimizer and activations take.

Parameters are counted from the real modules (or their meta-device twins at any size);
activations are *measured* by running the real FLUX transformer, adapter blocks and VAE
decoder on the meta device (no memory, no compute) and adding up the tensors autograd
saves for backward. Attention is counted as CUDA's flash / memory-efficient SDPA keeps
it (no L x L matrices). Not counted: the CUDA context (~0.5-1 GB), allocator
fragmentation, the ArcFace network's activations on 112 px crops (tens of MB) and the
frozen encoders' transient inference buffers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from withanyone_core.offline import settle_bitsandbytes

logger = logging.getLogger(__name__)

GB = 1e9
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 each


def device_frozen_bytes(modules: Iterable[nn.Module | None], offloaded: Iterable[nn.Module] = ()) -> float:
    """Frozen parameter and buffer bytes the training device holds: ``modules`` less ``offloaded``
    (modules kept in CPU memory, e.g. the idle adapter branch)."""
    return parameter_bytes(modules, trainable=False) - parameter_bytes(list(offloaded), trainable=False)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""

    frozen_weights: float
    trainable_weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer + self.activations

    @property
    def static(self) -> float:
        """Weights, gradients and optimizer states: what does not depend on the batch."""
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer

    def describe(self) -> str:
        return (
            f"{self.total / GB:.1f} GB (frozen weights {self.frozen_weights / GB:.1f}, trainable weights "
            f"{self.trainable_weights / GB:.1f}, gradients {self.gradients / GB:.1f}, optimizer states "
            f"{self.optimizer / GB:.1f}, activations {self.activations / GB:.1f})"
        )


def parameter_bytes(modules: Iterable[nn.Module | None], trainable: bool | None = None) -> float:
    """Bytes of the distinct parameters and buffers of ``modules`` (only frozen/trainable ones if given)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            is_trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
            if trainable is None or is_trainable == trainable:
                total += tensor.numel() * tensor.element_size()
    return float(total)


def optimizer_memory(
    trainable_params: int,
    zero_stage: int = 0,
    num_processes: int = 1,
    optimizer: str = "adamw",
    trainable_numels: Iterable[int] | None = None,
) -> tuple[float, float, float]:
    """(trainable weights, gradients, optimizer states) in bytes per GPU for ``trainable_params`` parameters.

    Plain DDP / one GPU: fp32 master weights, fp32 gradients, and the optimizer's states:
    AdamW two fp32 states (16 bytes per parameter in all), 8-bit AdamW two uint8 states plus
    block scales (see :func:`train.lean.optimizer_state_bytes`; given ``trainable_numels``, the
    per-tensor sizes, the count is exact). DeepSpeed ZeRO-2 (bf16): bf16 weights on every rank;
    fp32 master weights, AdamW states and gradients partitioned over the ranks.
    """
    p = float(trainable_params)
    if zero_stage == 0 and (optimizer != "adamw" or trainable_numels is not None):
        from .lean import optimizer_state_bytes

        numels = list(trainable_numels) if trainable_numels is not None else [int(p)]
        return 4 * p, 4 * p, optimizer_state_bytes(numels, optimizer)
    if optimizer != "adamw":
        raise ValueError(f"the {optimizer} states are not estimated under DeepSpeed ZeRO (it brings its own optimizer)")
    if zero_stage >= 2:
        n = max(1, num_processes)
        return 2 * p + 4 * p / n, 4 * p / n, 4 * ADAMW_STATES * p / n
    if zero_stage == 1:
        n = max(1, num_processes)
        return 2 * p + 4 * p / n, 4 * p, 4 * ADAMW_STATES * p / n
    return 4 * p, 4 * p, 4 * ADAMW_STATES * p


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns about ``.to(dtype)`` on a freshly built model; on the meta device it is harmless."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _SavedTensors:
    """Counts the bytes autograd saves for backward (parameters excluded; attention matrices optional)."""

    def __init__(
        self, params: Iterable[torch.Tensor], square: int | None = None, attention: tuple[int, int] | None = None
    ):
        self.param_ids = {id(p) for p in params}
        self.square = square
        self.attention = attention  # (queries, keys) of a cross-attention whose matrix flash attention drops
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) in self.param_ids or id(base) in self.param_ids:
            return t
        if self.square and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.square:
            return t  # an L x L attention matrix: flash attention keeps none
        if self.attention and t.dim() >= 2 and tuple(t.shape[-2:]) == self.attention:
            return t
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def transformer_activations(
    transformer_config: dict,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    gradient_checkpointing: bool,
    adapter_config=None,
    adapter_branches: tuple[str, ...] = ("arc",),
    persons: int = 2,
    frozen_storage: str = "default",
    adapter_lora_rank: int = 0,
) -> float:
    """Activation bytes of one FLUX (+ adapter) forward kept for backward, measured on the meta device.

    The adapter's residual runs in a forward hook of each block, so with gradient checkpointing it
    is recomputed with its block: only one block's adapter activations are alive at a time."""
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"), _quiet_diffusers():
        model = FluxTransformer2DModel.from_config(dict(transformer_config)).to(dtype).requires_grad_(False)
    if frozen_storage != "default":  # the layers the trainer runs (they keep no cast weight for backward)
        from .lean import store_frozen_fp8

        store_frozen_fp8(model, frozen_storage)
    image_tokens = (height // 16) * (width // 16)
    seq = image_tokens + text_tokens
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    per_block: list[int] = []
    counter = _SavedTensors(model.parameters(), square=seq)

    def before(module, args, kwargs):
        module._saved_start = counter.bytes

    def after(module, args, kwargs, output):
        per_block.append(counter.bytes - module._saved_start)

    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(after, with_kwargs=True) for b in blocks]
    cfg = model.config
    meta = dict(device="meta", dtype=dtype)
    latents = torch.empty(batch, image_tokens, cfg.in_channels, requires_grad=True, **meta)
    with counter:
        model(
            hidden_states=latents,
            encoder_hidden_states=torch.empty(batch, text_tokens, cfg.joint_attention_dim, **meta),
            pooled_projections=torch.empty(batch, cfg.pooled_projection_dim, **meta),
            timestep=torch.ones(batch, device="meta"),
            guidance=torch.ones(batch, device="meta"),
            img_ids=torch.zeros(image_tokens, 3, device="meta"),
            txt_ids=torch.zeros(text_tokens, 3, device="meta"),
            return_dict=False,
        )
    for h in handles:
        h.remove()
    outside = counter.bytes - sum(per_block)
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    block_input = batch * seq * hidden * torch.empty(0, dtype=dtype).element_size()
    if gradient_checkpointing:  # each block keeps its inputs; one block's activations live during recompute
        flux = outside + len(blocks) * block_input + max(per_block)
    else:
        flux = counter.bytes
    adapter = 0.0
    if adapter_config is not None and adapter_branches:
        adapter = _adapter_block_activations(
            adapter_config, adapter_branches, batch, image_tokens, persons, dtype, adapter_lora_rank
        )
        adapter *= 1 if gradient_checkpointing else len(blocks)
    return float(flux + adapter)


def _adapter_block_activations(
    adapter_config, branches, batch, image_tokens, persons, dtype, lora_rank: int = 0
) -> float:
    """Saved bytes of one block's identity residual (every image token in some box: the upper bound)."""
    from withanyone_core.adapter import IdentityCrossAttention

    cfg = adapter_config
    total = 0.0
    for branch in branches:
        per_person = cfg.arc_tokens if branch == "arc" else cfg.sig_tokens_per_person
        with torch.device("meta"):
            block = IdentityCrossAttention(cfg.hidden_size, cfg.num_heads, cfg.head_dim).to(dtype)
        if lora_rank:
            from train.lean import peft

            peft().inject_adapter_in_model(
                peft().LoraConfig(r=lora_rank, target_modules=["to_q", "to_kv", "to_out"]), block
            )
        img = torch.empty(batch, image_tokens, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=True)
        ids = torch.empty(batch, persons * per_person, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=True)
        counter = _SavedTensors(block.parameters(), attention=(image_tokens, persons * per_person))
        with counter:
            block(ids, img, None, per_person)
        total += counter.bytes
    return total


def decoder_activations(vae_config: dict, batch: int, height: int, width: int, dtype: torch.dtype) -> float:
    """Saved bytes of a VAE decode kept for the ID losses' backward (measured on the meta device)."""
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import AutoencoderKL

    with torch.device("meta"), _quiet_diffusers():
        vae = AutoencoderKL.from_config(dict(vae_config)).to(dtype).requires_grad_(False)
    z = torch.empty(
        batch, vae.config.latent_channels, height // 8, width // 8, device="meta", dtype=dtype, requires_grad=True
    )
    counter = _SavedTensors(vae.parameters(), square=(height // 8) * (width // 8))
    with counter:
        vae.decode(z)
    return float(counter.bytes)


def estimate_training_memory(
    *,
    frozen_bytes: float,
    trainable_params: int,
    transformer_config: dict,
    vae_config: dict,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    compute_dtype: torch.dtype,
    gradient_checkpointing: bool,
    id_losses: bool,
    adapter_config=None,
    adapter_branches: tuple[str, ...] = ("arc",),
    persons: int = 2,
    zero_stage: int = 0,
    num_processes: int = 1,
    optimizer: str = "adamw",
    trainable_numels: Iterable[int] | None = None,
    frozen_storage: str = "default",
    adapter_lora_rank: int = 0,
) -> MemoryEstimate:
    weights, grads, optim = optimizer_memory(trainable_params, zero_stage, num_processes, optimizer, trainable_numels)
    acts = transformer_activations(
        transformer_config,
        batch,
        height,
        width,
        text_tokens,
        compute_dtype,
        gradient_checkpointing,
        adapter_config,
        adapter_branches,
        persons,
        frozen_storage,
        adapter_lora_rank,
    )
    if id_losses:
        acts += decoder_activations(vae_config, batch, height, width, compute_dtype)
    return MemoryEstimate(frozen_bytes, weights, grads, optim, acts)


def lora_parameter_count(transformer: nn.Module, targets: Iterable[str], rank: int) -> int:
    """Parameters peft's LoRA adds for ``targets`` (module-name suffixes) at ``rank``."""
    targets = list(targets)
    count = 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += rank * (module.in_features + module.out_features)
    return count
