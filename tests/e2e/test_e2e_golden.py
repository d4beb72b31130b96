"""End-to-end parity with the authors' sampling loop (../shared/golden, "End-to-end cases").

Every ``*_e2e.json`` in ``WITHANYONE_GOLDEN_DIR`` is a whole sampling run of the authors'
pipeline (their schedule, masks, Euler loop) on a FLUX with FLUX.1-dev widths and 1 + 1
blocks, whose weights ``e2e_model.py`` rebuilds from a seed. For each case the pack runs:

- ``sampler``: the WithAnyone Sampler node with its DEFAULT settings (schedule included),
  overriding only what the case fixes (steps, guidance, weights, seed, batch);
- ``apply``: Apply WithAnyone + ComfyUI's own SamplerCustomAdvanced (RandomNoise,
  BasicGuider, KSamplerSelect "euler", FluxGuidance) with the WithAnyone Schedule node;
- ``ksampler``: Apply WithAnyone + the stock KSampler path, with ComfyUI's ModelSamplingFlux
  node set to max_shift = base_shift = the authors' mu and the "simple" scheduler — the
  core-node recipe README gives for users of the plain KSampler.

FLUX comes through ComfyUI's own diffusion-model loader, the adapter through the pack's
loader; text, pooled vector, ArcFace and SigLIP are the case's stored tensors. The result
must equal ``expected_latent`` to the README's tolerance (1e-4 max abs, LATENT space).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from support.comfy_env import import_comfyui
from support.golden import golden_dir

TOLERANCE = 1e-4  # max abs, LATENT space (README: the harness itself reproduces to 3.8e-6)
ROOT = Path(__file__).resolve().parents[2]
MODEL_CACHE = Path(os.environ.get("WITHANYONE_E2E_CACHE", ROOT / ".cache" / "golden_e2e"))
PATHS = ("sampler", "apply", "ksampler")


def _discover():
    cases = []
    for spec_path in sorted(golden_dir().glob("*_e2e.json")):
        spec = json.loads(spec_path.read_text())
        if spec.get("model") != "withanyone_e2e":
            continue
        name = spec_path.name[: -len("_e2e.json")]
        for case_name in spec["cases"]:
            cases.append(pytest.param(spec_path, name, case_name, id=f"{name}:{case_name}"))
    return cases


CASES = _discover()


def check_latent(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Max abs error of ``ours`` against ``expected`` (same shape), failing above ``tolerance``."""
    assert ours.shape == expected.shape, f"latent shape {tuple(ours.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(ours).all(), "the sampled latent has NaN or inf"
    err = float((ours.double() - expected.double()).abs().max())
    assert err <= tolerance, f"max abs error {err:.3e} > {tolerance:.0e}"
    return err


class _Models:
    """The case's FLUX (ComfyUI's loader) and adapter (the pack's loader) for one weights seed; one at a time."""

    current: tuple | None = None

    @classmethod
    def get(cls, seed: int):
        if cls.current is not None and cls.current[0] == seed:
            return cls.current[1:]
        cls.current = None
        import comfy.sd

        e2e_model = _load_e2e_model()
        flux_path, adapter_path = e2e_model.write_model_files(seed, str(MODEL_CACHE / str(seed)))
        model = comfy.sd.load_diffusion_model(flux_path, model_options={"dtype": torch.float32})
        pack = _pack()
        adapter = pack.nodes.loaders.load_adapter_patcher(adapter_path, "default")
        cls.current = (seed, model, adapter)
        return model, adapter


def _load_e2e_model():
    spec = importlib.util.spec_from_file_location("golden_e2e_model", golden_dir() / "e2e_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pack():
    """The pack imported as ComfyUI imports it, with the node modules the runs use."""
    import importlib
    import sys

    from support.comfy_env import import_pack

    pack = sys.modules.get("withanyone_pack") or import_pack()
    for module in ("nodes.loaders", "nodes.sampling", "nodes.types"):
        importlib.import_module(f"withanyone_pack.{module}")
    return pack


@pytest.fixture(scope="module", autouse=True)
def comfy():
    import_comfyui()
    yield
    _Models.current = None


def _case_data(spec_path: Path, name: str, case_name: str):
    from withanyone_core.checkpoints.reading import load_safetensors

    spec = json.loads(spec_path.read_text())
    case = spec["cases"][case_name]
    tensors = load_safetensors(spec_path.with_name(f"{name}_e2e.safetensors"))
    t = {k[len(case_name) + 1 :]: v for k, v in tensors.items() if k.startswith(case_name + ".")}
    return spec, case, t


def _weight_settings(case) -> dict:
    """The share control when the case's weights are of that form (the default path), else independent."""
    arc, sig = float(case["id_weight"]), float(case["siglip_weight"])
    if abs(arc + sig - 1.0) < 1e-12 and 0.0 <= sig <= 1.0:
        return {"weight_mode": "share", "siglip_share": sig}
    return {"weight_mode": "independent", "id_weight": arc, "siglip_weight": sig}


def _schema_defaults(node) -> dict:
    return {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}


def _inputs(case, t):
    pack = _pack()
    from withanyone_pack.nodes.types import Identities, Layout

    conditioning = [[t["txt"][:1], {"pooled_output": t["vec"][:1]}]]
    identities = Identities(t["arcface"][0], t["siglip"][0], (1,) * case["num_ids"])
    boxes = case["boxes"][0]
    layout = Layout(case["width"], case["height"], tuple(tuple(float(v) for v in b) for b in boxes))
    return pack, conditioning, identities, layout


def _run_sampler(model, adapter, case, t):
    pack, conditioning, identities, layout = _inputs(case, t)
    node = pack.nodes.sampling.WithAnyoneSampler
    settings = _schema_defaults(node)  # the node's defaults, schedule included
    settings.update(
        seed=case["noise_seed"],
        steps=case["steps"],
        guidance=case["guidance"],
        batch_size=case["batch"],
        **_weight_settings(case),
    )
    out = node.execute(model, conditioning, conditioning, adapter, identities, layout, **settings)
    return out.result[0]["samples"]


def _apply(model, adapter, case, t):
    pack, conditioning, identities, layout = _inputs(case, t)
    node = pack.nodes.sampling.WithAnyoneApply
    settings = _schema_defaults(node)
    settings.update(_weight_settings(case))
    patched = node.execute(model, adapter, identities, layout=layout, **settings).result[0]
    return pack, patched, conditioning, layout


def _run_apply_custom_advanced(model, adapter, case, t):
    from comfy_extras.nodes_custom_sampler import BasicGuider, KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_flux import FluxGuidance
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    pack, patched, conditioning, layout = _apply(model, adapter, case, t)
    conditioning = FluxGuidance.execute(conditioning, case["guidance"]).result[0]
    schedule = pack.nodes.sampling.WithAnyoneSchedule
    sigmas = schedule.execute(**{**_schema_defaults(schedule), "steps": case["steps"]}, layout=layout).result[0]
    latent = EmptySD3LatentImage.execute(case["width"], case["height"], case["batch"]).result[0]
    out = SamplerCustomAdvanced.execute(
        RandomNoise.execute(case["noise_seed"]).result[0],
        BasicGuider.execute(patched, conditioning).result[0],
        KSamplerSelect.execute("euler").result[0],
        sigmas,
        latent,
    )
    return out.result[0]["samples"]


def _run_apply_ksampler(model, adapter, case, t):
    """What the KSampler node runs (comfy.sample.sample with ComfyUI's noise for the seed); ComfyUI's ``nodes``
    module itself is not imported: the pack's own ``nodes`` package shadows it on this test's path."""
    import comfy.sample
    from comfy_extras.nodes_flux import FluxGuidance
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    from withanyone_core.recipe import authors_mu

    pack, patched, conditioning, layout = _apply(model, adapter, case, t)
    mu = authors_mu(case["height"] // 8, case["width"] // 8)
    patched = ModelSamplingFlux().patch(patched, mu, mu, case["width"], case["height"])[0]
    conditioning = FluxGuidance.execute(conditioning, case["guidance"]).result[0]
    latent = EmptySD3LatentImage.execute(case["width"], case["height"], case["batch"]).result[0]["samples"]
    latent = comfy.sample.fix_empty_latent_channels(patched, latent)
    noise = comfy.sample.prepare_noise(latent, case["noise_seed"])
    return comfy.sample.sample(
        patched,
        noise,
        case["steps"],
        1.0,
        "euler",
        "simple",
        conditioning,
        conditioning,
        latent,
        seed=case["noise_seed"],
        disable_pbar=True,
    )


RUNNERS = {"sampler": _run_sampler, "apply": _run_apply_custom_advanced, "ksampler": _run_apply_ksampler}


@pytest.mark.slow
@pytest.mark.skipif(not CASES, reason="no *_e2e.json golden sets in WITHANYONE_GOLDEN_DIR")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec_path,name,case_name", CASES)
def test_e2e_case(spec_path, name, case_name, path):
    spec, case, t = _case_data(spec_path, name, case_name)
    if path == "ksampler" and 10000 % case["steps"]:
        pytest.skip("ComfyUI's simple scheduler hits the authors' timesteps exactly only when steps divide 10000")
    model, adapter = _Models.get(int(case.get("weights_seed", spec["weights_seed"])))
    ours = RUNNERS[path](model, adapter, case, t)
    check_latent(ours, t["expected_latent"])


def test_golden_e2e_sets_are_found_in_ci():
    """The parity cases skip only where no golden data is laid out; in CI a missing set is a failure, not a skip."""
    if os.environ.get("CI"):
        assert CASES, f"no *_e2e.json golden sets in {golden_dir()} (WITHANYONE_GOLDEN_DIR)"
    elif not CASES:
        pytest.skip(f"no *_e2e.json golden sets in {golden_dir()}")


def test_check_latent_fails_on_a_perturbed_expectation():
    """The comparison is strict: one element off by 10x the tolerance fails, as do NaN and a wrong shape."""
    expected = torch.randn(1, 16, 8, 8) * 5
    assert check_latent(expected.clone(), expected) == 0.0
    perturbed = expected.clone()
    perturbed[0, 3, 2, 1] += 10 * TOLERANCE
    with pytest.raises(AssertionError, match="max abs error"):
        check_latent(expected, perturbed)
    nan = expected.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        check_latent(nan, expected)
    with pytest.raises(AssertionError, match="shape"):
        check_latent(expected[:, :, :4], expected)


def test_default_schedule_is_the_authors():
    """The sampler's and the scheduler node's defaults are the authors' recipe (25 steps, guidance 4, their sigmas)."""
    pack = _pack()
    from withanyone_core.recipe import authors_sigmas

    sampler = _schema_defaults(pack.nodes.sampling.WithAnyoneSampler)
    assert (sampler["steps"], sampler["guidance"], sampler["cfg"], sampler["sampler_name"]) == (25, 4.0, 1.0, "euler")
    assert sampler["schedule"] == pack.nodes.sampling.AUTHORS_SCHEDULE
    assert (sampler["weight_mode"], sampler["siglip_share"]) == ("share", 0.0)
    sigmas = authors_sigmas(25, 96, 96)  # 768 x 768: seq 36, mu 0.46276
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 26
    assert abs(float(sigmas[13]) - 0.5945) < 1e-4  # at t = 0.48; ComfyUI's default FLUX shift (1.15) gives 0.745
