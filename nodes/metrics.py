"""Identity metrics node: a live copy-paste meter for generated images.

It scores with the same function as ``python -m withanyone_core.bench_eval``
(:func:`withanyone_core.bench_eval.score_identity`): every face of the output against the
identities (Hungarian on cosine), every face of the ground truth likewise, CP with its own
two matchings. The references are the identities' ArcFace embeddings; the CLI detects them
on each reference photo padded 1.5x onto black, so for the CLI's numbers feed Face Extract
the padded photo (``withanyone_core.bench.faces.pad_reference``) and the same face model.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from .types import FACE_ANALYZER, IDENTITIES, Identities


def _rgb(image: torch.Tensor, name: str):
    from ..withanyone_core.faces.images import to_rgb_uint8

    return to_rgb_uint8(image.detach().cpu().float().numpy(), name)  # RGBA / grey IMAGEs as well


def _fmt(value, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


class WithAnyoneIdentityMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneIdentityMetrics",
            display_name="WithAnyone Identity Metrics",
            category="WithAnyone",
            description="Sim(Ref), Sim(GT) and the copy-paste score CP (+1: a copy of the reference, -1: the ground "
            "truth) per person, for each generated image, as MultiID-Bench computes them.",
            inputs=[
                io.Image.Input("image", tooltip="generated image(s)"),
                FACE_ANALYZER.Input("face_analyzer", tooltip="finds and embeds the generated faces"),
                IDENTITIES.Input("identities", tooltip="the reference persons the image was made with"),
                io.Image.Input("ground_truth", optional=True, tooltip="a real photo of the same people (for CP)"),
            ],
            outputs=[
                io.String.Output(display_name="metrics_json", tooltip="Sim(Ref), Sim(GT) and CP per person, as JSON")
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, image: torch.Tensor, face_analyzer, identities: Identities, ground_truth: torch.Tensor | None = None
    ) -> io.NodeOutput:
        from ..withanyone_core.bench.faces import InsightFaceModel
        from ..withanyone_core.bench_eval import score_identity

        model = InsightFaceModel.from_analyzer(face_analyzer)
        refs = identities.arcface.detach().cpu().double().numpy()
        truth = _rgb(ground_truth[0], "ground truth") if ground_truth is not None else None
        results = [
            score_identity(model, _rgb(image[i], f"image {i + 1}"), truth, [], reference_embeddings=refs)
            for i in range(image.shape[0])
        ]
        lines = []
        for i, r in enumerate(results):
            if truth is not None and r["cp"] is None:
                lines.append(
                    f"image {i + 1}: CP undefined: {r['faces_generated']} face(s) generated, "
                    f"{r['faces_ground_truth']} in the ground truth, {len(refs)} identities"
                )
            for p in r["persons"]:
                if p["generated_face"] is None:
                    lines.append(f"image {i + 1} person {p['person']}: no matching face found")
                    continue
                parts = [f"Sim(Ref) {_fmt(p['sim_ref'])}"]
                if "sim_gt" in p:
                    parts.append(f"Sim(GT) {_fmt(p['sim_gt'])}")
                if "cp" in p:
                    parts.append(f"CP {_fmt(p['cp'], signed=True)}")
                lines.append(f"image {i + 1} person {p['person']}: " + ", ".join(parts))
        text = json.dumps(results if len(results) > 1 else results[0], indent=1)
        return io.NodeOutput(text, ui=ui.PreviewText("\n".join(lines)))


NODES = [WithAnyoneIdentityMetrics]
