"""Identity metrics node: a live copy-paste meter for generated images."""

from __future__ import annotations

import json

import numpy as np
import torch
from comfy_api.latest import io, ui

from .types import FACE_ANALYZER, IDENTITIES, Identities


class WithAnyoneIdentityMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneIdentityMetrics",
            display_name="WithAnyone Identity Metrics",
            category="WithAnyone",
            description="Sim(Ref), Sim(GT) and the copy-paste score CP (+1: a copy of the reference, -1: the ground "
                        "truth) per person, for each generated image.",
            inputs=[
                io.Image.Input("image", tooltip="generated image(s)"),
                FACE_ANALYZER.Input("face_analyzer"),
                IDENTITIES.Input("identities"),
                io.Image.Input("ground_truth", optional=True, tooltip="a real photo of the same people (for CP)"),
            ],
            outputs=[io.String.Output(display_name="metrics_json")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, face_analyzer, identities: Identities,
                ground_truth: torch.Tensor | None = None) -> io.NodeOutput:
        from withanyone_core.metrics import identity_metrics, match_faces

        refs = identities.arcface.numpy()
        gt = None
        if ground_truth is not None:
            pixels = (ground_truth[0].cpu().numpy() * 255).round().astype(np.uint8)
            gt_faces = [f.embedding for f in face_analyzer.analyze(pixels, image_name="ground truth")]
            pairs = dict(match_faces(np.array(gt_faces).reshape(-1, 512), refs))
            if len(pairs) != len(refs):
                raise ValueError(f"the ground-truth image shows {len(gt_faces)} face(s) for {len(refs)} identities: "
                                 "use a photo with every person visible, or leave ground_truth empty")
            gt = np.stack([gt_faces[pairs[k]] for k in range(len(refs))])
        results = []
        for i in range(image.shape[0]):
            pixels = (image[i].cpu().numpy() * 255).round().astype(np.uint8)
            faces = [f.embedding for f in face_analyzer.analyze(pixels, image_name=f"image {i + 1}")]
            results.append(identity_metrics(np.array(faces).reshape(-1, 512), refs, gt))
        lines = []
        for i, r in enumerate(results):
            for p in r["persons"]:
                if p["generated_face"] is None:
                    lines.append(f"image {i + 1} person {p['person']}: no matching face found")
                    continue
                parts = [f"Sim(Ref) {p['sim_ref']:.3f}"]
                if "sim_gt" in p:
                    parts += [f"Sim(GT) {p['sim_gt']:.3f}", f"CP {p['cp']:+.3f}"]
                lines.append(f"image {i + 1} person {p['person']}: " + ", ".join(parts))
        text = json.dumps(results if len(results) > 1 else results[0], indent=1)
        return io.NodeOutput(text, ui=ui.PreviewText("\n".join(lines)))


NODES = [WithAnyoneIdentityMetrics]
