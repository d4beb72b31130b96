"""Apply WithAnyone to a MODEL, and the all-in-one WithAnyone sampler."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .types import ADAPTER, IDENTITIES, LAYOUT, Identities, Layout

CATEGORY = "WithAnyone"

WEIGHT_TIPS = {
    "id_weight": "ArcFace branch: resemblance 'in spirit' (identity features, free pose/expression)",
    "siglip_weight": "SigLIP branch: resemblance 'in form' (appearance of the reference photo)",
}


def check_counts(identities: Identities, layout: Layout | None) -> None:
    if layout is not None and layout.num_persons != identities.count:
        raise ValueError(
            f"the layout has {layout.num_persons} face boxes but {identities.count} identities are connected: "
            "give one box per person (box k is identity k), or change the number of persons"
        )


def patch_model(model, adapter, identities: Identities, layout: Layout | None, id_weight: float,
                siglip_weight: float, start_percent: float = 0.0, end_percent: float = 1.0):
    from .patch import apply_withanyone

    check_counts(identities, layout)
    boxes = layout.boxes if layout is not None else None
    size = (layout.width, layout.height) if layout is not None else None
    return apply_withanyone(model, adapter, identities.arcface, identities.siglip, size, boxes, id_weight,
                            siglip_weight, start_percent, end_percent)


def _weights():
    return [
        io.Float.Input("id_weight", default=1.0, min=0.0, max=3.0, step=0.05, tooltip=WEIGHT_TIPS["id_weight"]),
        io.Float.Input("siglip_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                       tooltip=WEIGHT_TIPS["siglip_weight"]),
    ]


class WithAnyoneApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneApply",
            display_name="Apply WithAnyone",
            category=CATEGORY,
            description="Patches a FLUX.1 MODEL (a clone; the input MODEL is untouched) so each person's face box "
                        "attends to that person's identity. Works with the stock KSampler and LoRA loaders.",
            inputs=[
                io.Model.Input("model"),
                ADAPTER.Input("adapter"),
                IDENTITIES.Input("identities"),
                LAYOUT.Input("layout", optional=True, tooltip="without a layout every token sees every person"),
                *_weights(),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, identities: Identities, id_weight: float, siglip_weight: float,
                start_percent: float, end_percent: float, layout: Layout | None = None) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, adapter, identities, layout, id_weight, siglip_weight,
                                         start_percent, end_percent))


class WithAnyoneSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="WithAnyoneSampler",
            display_name="WithAnyone Sampler",
            category=CATEGORY,
            description="All in one: applies WithAnyone and samples with ComfyUI's own sampling code; the image "
                        "size comes from the layout.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                ADAPTER.Input("adapter"),
                IDENTITIES.Input("identities"),
                LAYOUT.Input("layout"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=28, min=1, max=200),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="1.0 for FLUX.1-dev (guidance-distilled); >1 also runs the negative"),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1),
                io.Int.Input("batch_size", default=1, min=1, max=16),
                *_weights(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, adapter, identities: Identities, layout: Layout, seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, guidance: float, batch_size: int,
                id_weight: float, siglip_weight: float) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import node_helpers

        patched = patch_model(model, adapter, identities, layout, id_weight, siglip_weight)
        latent = torch.zeros(batch_size, 16, layout.height // 8, layout.width // 8,
                             device=comfy.model_management.intermediate_device())
        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
        samples = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent, seed=seed)
        return io.NodeOutput({"samples": samples})


NODES = [WithAnyoneApply, WithAnyoneSampler]
