"""Apply WithAnyone to a MODEL, the all-in-one WithAnyone sampler, and the authors' schedule as SIGMAS."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..withanyone_core import recipe
from ..withanyone_core.wording import count_noun
from .schema import advanced
from .types import ADAPTER, IDENTITIES, LAYOUT, Identities, Layout

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone"
AUTHORS_SCHEDULE = "withanyone (authors)"

SHARE_TIP = (
    "The authors' single control, 'resemblance in spirit <-> in form'. 0 (default, the authors' "
    "recommendation): only the ArcFace branch - identity features, pose and expression follow the prompt. "
    "1: only the SigLIP branch - the reference photo's appearance, closer likeness but more copy-paste. "
    "ArcFace gets 1 - share, SigLIP gets share."
)
MODE_TIP = (
    "share (default, as the authors): one slider, siglip_share. independent: id_weight and siglip_weight "
    "as given (their sum above 1 strengthens the identity beyond what was trained)"
)
WEIGHT_TIPS = {
    "id_weight": "independent mode only: weight of the ArcFace branch (identity 'in spirit'); 0 turns it off",
    "siglip_weight": "independent mode only: weight of the SigLIP branch (appearance 'in form'); 0 turns it off",
}


def check_counts(identities: Identities, layout: Layout | None) -> None:
    if layout is not None and layout.num_persons != identities.count:
        raise ValueError(
            f"the layout has {count_noun(layout.num_persons, 'face box', 'face boxes')} but "
            f"{count_noun(identities.count, 'identity is', 'identities are')} connected: give one box per person "
            "(box k is identity k), or change the number of persons"
        )


def patch_model(
    model,
    adapter,
    identities: Identities,
    layout: Layout | None,
    id_weight: float,
    siglip_weight: float,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
):
    from .patch import apply_withanyone

    check_counts(identities, layout)
    siglip = identities.siglip if siglip_weight != 0.0 else None
    return apply_withanyone(
        model, adapter, identities.arcface, siglip, layout, id_weight, siglip_weight, start_percent, end_percent
    )


def _weight_inputs() -> list:
    return [
        io.Float.Input(
            "siglip_share", default=recipe.DEFAULT_SIGLIP_SHARE, min=0.0, max=1.0, step=0.05, tooltip=SHARE_TIP
        ),
        advanced(io.Combo.Input("weight_mode", options=list(recipe.WEIGHT_MODES), default="share", tooltip=MODE_TIP)),
        advanced(
            io.Float.Input("id_weight", default=1.0, min=0.0, max=3.0, step=0.05, tooltip=WEIGHT_TIPS["id_weight"])
        ),
        advanced(
            io.Float.Input(
                "siglip_weight", default=0.0, min=0.0, max=3.0, step=0.05, tooltip=WEIGHT_TIPS["siglip_weight"]
            )
        ),
    ]


def _branch_weights(weight_mode: str, siglip_share: float, id_weight: float, siglip_weight: float):
    arc, sig = recipe.branch_weights(weight_mode, siglip_share, id_weight, siglip_weight)
    if arc == 0.0 and sig == 0.0:
        logger.warning("WithAnyone: both branch weights are 0, the identities have no effect")
    return arc, sig


def schedule_sigmas(model, schedule: str, steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """The authors' sigmas for the latent size, or ComfyUI's scheduler on the MODEL's own sampling."""
    if schedule == AUTHORS_SCHEDULE:
        return recipe.authors_sigmas(steps, latent_height, latent_width)
    import comfy.samplers

    if schedule not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"unknown schedule {schedule!r}: use {AUTHORS_SCHEDULE!r} or one of ComfyUI's schedulers")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), schedule, steps).cpu()


class WithAnyoneApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneApply",
            display_name="Apply WithAnyone",
            category=CATEGORY,
            description="Patches a FLUX.1 MODEL (a clone; the input MODEL is untouched) so each person's face box "
            "attends to that person's identity. Use it with SamplerCustomAdvanced and the WithAnyone "
            "Schedule node for the authors' results; the stock KSampler and LoRA loaders work too. A "
            "block patch already on the MODEL (another pack's, or an earlier Apply WithAnyone) keeps "
            "working: a second Apply adds its people.",
            inputs=[
                io.Model.Input("model", tooltip="a FLUX.1 model (dev or a fine-tune), fp8/GGUF loaders included"),
                ADAPTER.Input("adapter", tooltip="from Load WithAnyone Adapter"),
                IDENTITIES.Input("identities", tooltip="from WithAnyone Identity Encode: person k goes into box k"),
                LAYOUT.Input(
                    "layout",
                    optional=True,
                    tooltip="face boxes; without a layout every image token sees every person. A layout "
                    "drawn for another size is scaled uniformly and centred",
                ),
                *_weight_inputs(),
                advanced(
                    io.Float.Input(
                        "start_percent",
                        default=0.0,
                        min=0.0,
                        max=1.0,
                        step=0.01,
                        tooltip="identities act from this point of the schedule (0 = the first step)",
                    )
                ),
                advanced(
                    io.Float.Input(
                        "end_percent",
                        default=1.0,
                        min=0.0,
                        max=1.0,
                        step=0.01,
                        tooltip="identities act until this point of the schedule (1 = the last step)",
                    )
                ),
            ],
            outputs=[io.Model.Output(tooltip="the patched clone of the MODEL")],
        )

    @classmethod
    def execute(
        cls,
        model,
        adapter,
        identities: Identities,
        siglip_share: float,
        weight_mode: str,
        id_weight: float,
        siglip_weight: float,
        start_percent: float,
        end_percent: float,
        layout: Layout | None = None,
    ) -> io.NodeOutput:
        arc, sig = _branch_weights(weight_mode, siglip_share, id_weight, siglip_weight)
        return io.NodeOutput(patch_model(model, adapter, identities, layout, arc, sig, start_percent, end_percent))


class WithAnyoneSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneSchedule",
            display_name="WithAnyone Schedule (authors' sigmas)",
            category=CATEGORY,
            description="The authors' noise schedule for an image size, as SIGMAS for SamplerCustomAdvanced: "
            "t = linspace(1, 0, steps + 1) shifted with mu = 0.5 + (seq - 256) * 0.65 / 3840, "
            "seq = (W / 8) * (H / 8) // 256 (about 0.46, where ComfyUI's FLUX default shift is 1.15).",
            inputs=[
                io.Int.Input(
                    "steps", default=recipe.DEFAULT_STEPS, min=1, max=200, tooltip="Euler steps (the authors use 25)"
                ),
                io.Int.Input(
                    "width",
                    default=recipe.DEFAULT_SIZE,
                    min=16,
                    max=8192,
                    step=16,
                    tooltip="output width in pixels (ignored when a layout is connected)",
                ),
                io.Int.Input(
                    "height",
                    default=recipe.DEFAULT_SIZE,
                    min=16,
                    max=8192,
                    step=16,
                    tooltip="output height in pixels (ignored when a layout is connected)",
                ),
                LAYOUT.Input("layout", optional=True, tooltip="take the size from this layout"),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 sigmas from 1 down to 0")],
        )

    @classmethod
    def execute(cls, steps: int, width: int, height: int, layout: Layout | None = None) -> io.NodeOutput:
        if layout is not None:
            width, height = layout.width, layout.height
        return io.NodeOutput(recipe.authors_sigmas(steps, height // 8, width // 8))


def _preview_callback(model, steps: int):
    """ComfyUI's progress bar and live previews (latent_preview), plus interrupt between steps."""
    import comfy.model_management
    import latent_preview

    preview = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview(step, x0, x, total_steps)

    return callback


class WithAnyoneSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="WithAnyoneSampler",
            display_name="WithAnyone Apply + Sample",
            category=CATEGORY,
            description="All in one, with the authors' recipe by default (their schedule, 25 Euler steps, "
            "guidance 4.0, no CFG): applies WithAnyone and samples with ComfyUI's own sampling code; "
            "the image size comes from the layout. Shows progress and live previews.",
            inputs=[
                io.Model.Input("model", tooltip="a FLUX.1 model (dev or a fine-tune)"),
                io.Conditioning.Input("positive", tooltip="the prompt (CLIP Text Encode with FLUX's encoders)"),
                io.Conditioning.Input("negative", tooltip="used only when cfg > 1"),
                ADAPTER.Input("adapter", tooltip="from Load WithAnyone Adapter"),
                IDENTITIES.Input("identities", tooltip="from WithAnyone Identity Encode: person k goes into box k"),
                LAYOUT.Input("layout", tooltip="face boxes; also fixes the image size"),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="noise seed (ComfyUI's noise, as the stock KSampler makes it)",
                ),
                io.Int.Input(
                    "steps", default=recipe.DEFAULT_STEPS, min=1, max=200, tooltip="sampling steps (the authors use 25)"
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="1.0 for FLUX.1-dev (guidance-distilled, the authors' setting); >1 also runs "
                    "the negative and doubles the time",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler",
                    tooltip="euler is the authors' sampler",
                ),
                io.Combo.Input(
                    "schedule",
                    options=[AUTHORS_SCHEDULE, *comfy.samplers.KSampler.SCHEDULERS],
                    default=AUTHORS_SCHEDULE,
                    tooltip="the authors' schedule for this image size (default), or one of ComfyUI's "
                    "schedulers on the MODEL's own sampling (FLUX shift 1.15)",
                ),
                io.Float.Input(
                    "guidance",
                    default=recipe.DEFAULT_GUIDANCE,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="FLUX guidance (the distilled guidance embedding); the authors use 4.0",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="images per run, each with its own noise"),
                *_weight_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="decode with VAE Decode")],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        adapter,
        identities: Identities,
        layout: Layout,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        schedule: str,
        guidance: float,
        batch_size: int,
        siglip_share: float,
        weight_mode: str,
        id_weight: float,
        siglip_weight: float,
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import node_helpers

        arc, sig = _branch_weights(weight_mode, siglip_share, id_weight, siglip_weight)
        patched = patch_model(model, adapter, identities, layout, arc, sig)
        latent = torch.zeros(
            batch_size, 16, layout.height // 8, layout.width // 8, device=comfy.model_management.intermediate_device()
        )
        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = schedule_sigmas(patched, schedule, steps, latent.shape[-2], latent.shape[-1])
        positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
        negative = node_helpers.conditioning_set_values(negative, {"guidance": guidance})
        samples = comfy.sample.sample_custom(
            patched,
            noise,
            cfg,
            comfy.samplers.sampler_object(sampler_name),
            sigmas,
            positive,
            negative,
            latent,
            callback=_preview_callback(patched, steps),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        return io.NodeOutput({"samples": samples})


NODES = [WithAnyoneApply, WithAnyoneSchedule, WithAnyoneSampler]
