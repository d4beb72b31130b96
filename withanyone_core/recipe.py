"""The authors' sampling recipe (their ``pipeline.py``, ``gradio_app.py``, ``infer_withanyone.py``).

- Schedule: ``get_schedule(steps, (W // 8) * (H // 8) // 256, shift=True)``: for
  ``t = linspace(1, 0, steps + 1)``, ``sigma = e^mu / (e^mu + (1 / t - 1))`` with
  ``mu = 0.5 + (seq - 256) * 0.65 / 3840``. ``seq`` is 1/64 of the image token count
  (the authors pass the latent's pixel count / 256, not the token count the original FLUX
  code uses), so mu stays near 0.46 at 512-1024 px, where ComfyUI's default FLUX shift is
  1.15. Computed in float32 as the authors' torch code does.
- Weights: one control, the SigLIP share ``s`` ("resemblance in spirit <-> in form"):
  ``id_weight = 1 - s``, ``siglip_weight = s``; the authors' examples and README use s = 0.
- Euler steps, 25 of them, FLUX guidance 4.0, no CFG; demo size 768 x 768.
"""

from __future__ import annotations

import math

import torch

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0
DEFAULT_SIZE = 768  # the demo's width and height (its sliders span 512-1024)
DEFAULT_SIGLIP_SHARE = 0.0  # the authors' examples and README recommendation
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15

WEIGHT_MODES = ("share", "independent")


def authors_image_seq_len(latent_height: int, latent_width: int) -> int:
    """The ``image_seq_len`` the authors pass to ``get_schedule``: ``(W // 8) * (H // 8) // 256``."""
    if latent_height <= 0 or latent_width <= 0:
        raise ValueError(f"latent size must be positive, got {latent_width}x{latent_height}")
    return (latent_width * latent_height) // 256


def flux_mu(
    image_seq_len: float,
    base_seq: int = 256,
    max_seq: int = 4096,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """FLUX's resolution-dependent shift: linear in the sequence length it is given (``base_shift`` at
    ``base_seq``, ``max_shift`` at ``max_seq``)."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return slope * image_seq_len + (base_shift - slope * base_seq)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX's time shift ``e^mu / (e^mu + (1 / t - 1))``, in ``t``'s dtype; t = 0 stays 0."""
    safe = t.clamp(min=1e-12)
    return torch.where(t > 0, math.exp(mu) / (math.exp(mu) + (1.0 / safe - 1.0)), torch.zeros_like(t))


def shifted_schedule(steps: int, mu: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``linspace(1, 0, steps + 1)`` shifted with ``mu``: FLUX's sigmas (the sampler's, and the trainer's
    timestep table)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return time_shift(mu, torch.linspace(1, 0, steps + 1, dtype=dtype))


def authors_mu(latent_height: int, latent_width: int) -> float:
    return flux_mu(authors_image_seq_len(latent_height, latent_width))


def authors_sigmas(steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """The authors' ``steps + 1`` sigmas (1 down to 0) for a latent of that size, float32."""
    return shifted_schedule(steps, authors_mu(latent_height, latent_width))


def branch_weights(
    mode: str, siglip_share: float, id_weight: float = 1.0, siglip_weight: float = 0.0
) -> tuple[float, float]:
    """(ArcFace weight, SigLIP weight) for a weight mode.

    ``share``: the authors' single control, ArcFace ``1 - s`` and SigLIP ``s`` (s in 0..1),
    so the identity residual is never doubled. ``independent``: both as given.
    """
    if mode == "share":
        if not 0.0 <= siglip_share <= 1.0:
            raise ValueError(f"siglip_share must be between 0 and 1, got {siglip_share}")
        return 1.0 - float(siglip_share), float(siglip_share)
    if mode == "independent":
        if id_weight < 0 or siglip_weight < 0:
            raise ValueError(f"weights must not be negative, got id {id_weight}, siglip {siglip_weight}")
        return float(id_weight), float(siglip_weight)
    raise ValueError(f"unknown weight mode {mode!r}: use one of {', '.join(WEIGHT_MODES)}")


def diffusers_scheduler_overrides(height: int, width: int) -> dict:
    """Config overrides that make diffusers' ``FlowMatchEulerDiscreteScheduler`` (as FluxPipeline uses it, with
    dynamic shifting) produce the authors' schedule for a ``height x width`` image: FluxPipeline computes mu from
    the token count, so both ends of its linear map are pinned to the authors' mu."""
    mu = authors_mu(height // 8, width // 8)
    return {"base_shift": mu, "max_shift": mu, "use_dynamic_shifting": True}
