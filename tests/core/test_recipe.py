"""The authors' recipe in the core: the schedule formula, the share control, and the diffusers override."""

import math

import numpy as np
import pytest
import torch

from withanyone_core import recipe


@pytest.mark.parametrize("size,mu", [(512, 0.459375), (768, 0.5 + (36 - 256) * 0.65 / 3840), (1024, 0.4675)])
def test_mu_uses_one_64th_of_the_token_count(size, mu):
    assert math.isclose(recipe.authors_mu(size // 8, size // 8), mu, rel_tol=0, abs_tol=1e-12)


def test_sigmas_formula_and_ends():
    sigmas = recipe.authors_sigmas(25, 96, 96)
    t = np.linspace(1, 0, 26)[1:-1]
    mu = recipe.authors_mu(96, 96)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert sigmas.dtype == torch.float32 and sigmas[0] == 1 and sigmas[-1] == 0
    assert np.allclose(sigmas[1:-1].numpy(), expected, atol=1e-6)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    with pytest.raises(ValueError, match="steps"):
        recipe.authors_sigmas(0, 96, 96)


def test_share_never_doubles_the_residual():
    assert recipe.branch_weights("share", 0.0) == (1.0, 0.0)
    assert recipe.branch_weights("share", 0.3) == (0.7, 0.3)
    assert recipe.branch_weights("independent", 0.3, 1.0, 1.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        recipe.branch_weights("share", 1.5)
    with pytest.raises(ValueError, match="unknown weight mode"):
        recipe.branch_weights("both", 0.0)


@pytest.mark.parametrize("height,width,steps", [(1024, 1024, 25), (768, 512, 10)])
def test_diffusers_flux_scheduler_gives_the_authors_sigmas(height, width, steps):
    """diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline drives it (default sigmas linspace(1, 1/steps),
    mu from the token count through base/max shift) yields the authors' schedule with the overrides."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        scheduler.config, **recipe.diffusers_scheduler_overrides(height, width)
    )
    tokens = (height // 16) * (width // 16)
    cfg = scheduler.config
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.allclose(scheduler.sigmas.float(), recipe.authors_sigmas(steps, height // 8, width // 8), atol=1e-6)
