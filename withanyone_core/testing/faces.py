"""Tiny antelopev2 stand-ins with the real interfaces, and images whose faces they find.

``build_tiny_antelopev2(root)`` writes ``root/models/antelopev2/`` with the five file
names users have. insightface routes each ONNX by its inputs/outputs exactly as it does
the real ones:

- ``scrfd_10g_bnkps.onnx``: an SCRFD-style detector, 9 outputs (scores, box distances,
  5-point keypoints at strides 8/16/32, two anchors per cell). It "sees" a face where a
  stride-32 cell of the detector input is pure green (:func:`paint_face` draws one):
  score ~1 there, a 64x64 box centred on the cell and five landmarks at
  :data:`LANDMARK_OFFSETS` from the centre — so tests know every box and landmark.
- ``glintr100.onnx``: a 112x112 -> 512 recognizer (average pooling + a fixed random
  projection; normalisation outside the model, like the real glintr100).
- ``1k3d68.onnx``, ``2d106det.onnx``, ``genderage.onnx``: landmark/attribute models with
  the real input sizes and output widths (only used by the reference-style benchmark).

``make_face_image`` paints faces on a 640x640 canvas (the detector's input size, so
coordinates are exact) with an identity-specific texture around each marker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
FACE_CELL = 32  # the detector fires on green 32x32 cells (stride-32 grid)
BOX_HALF = 32.0  # boxes are 64x64 around the cell centre
_ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# landmarks relative to the box centre: insightface's template scaled to the 64 px box
LANDMARK_OFFSETS = (_ARCFACE_DST - 56.0) * (2 * BOX_HALF / 112.0)


def _burn_branch(nodes, inits, source: str, size: int, gflops: float, prefix: str) -> str:
    """Conv layers costing about ``gflops`` on a ``size``-px input whose result is multiplied by 0.

    Gives a stand-in model the compute of the real architecture without changing its outputs.
    Returns the name of a [1, 1] zero tensor to add to an output.
    """
    from onnx import TensorProto, helper

    layers, side = 4, size // 2
    channels = max(4, int(round((gflops * 1e9 / layers / (2 * 9 * side * side)) ** 0.5)))
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)

    def weight(name, shape):
        w = (rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32)
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, shape, w.ravel()))

    weight(f"{prefix}_w0", [channels, 3, 3, 3])
    nodes.append(
        helper.make_node("Conv", [source, f"{prefix}_w0"], [f"{prefix}_c0"], strides=[2, 2], pads=[1, 1, 1, 1])
    )
    last = f"{prefix}_c0"
    for i in range(1, layers + 1):
        weight(f"{prefix}_w{i}", [channels, channels, 3, 3])
        nodes.append(helper.make_node("Conv", [last, f"{prefix}_w{i}"], [f"{prefix}_c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{prefix}_c{i}"], [f"{prefix}_r{i}"]))
        last = f"{prefix}_r{i}"
    nodes.append(helper.make_node("ReduceMean", [last], [f"{prefix}_mean"], keepdims=0))
    inits.append(helper.make_tensor(f"{prefix}_zero", TensorProto.FLOAT, [], [0.0]))
    nodes.append(helper.make_node("Mul", [f"{prefix}_mean", f"{prefix}_zero"], [f"{prefix}_out"]))
    return f"{prefix}_out"


def _detector_model(burn_gflops: float = 0.0):
    from onnx import TensorProto, helper

    nodes, inits = [], []

    def const(name, values, dims):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, dims, np.asarray(values, np.float32).ravel()))

    # greenness of the normalised blob: G - (R + B) / 2 (the blob is RGB after swapRB)
    const("green_w", [-0.5, 1.0, -0.5], [1, 3, 1, 1])
    nodes.append(helper.make_node("Conv", ["input.1", "green_w"], ["green"], name="green"))
    const("ten", [10.0], [])
    const("half", [0.5], [])
    const("neg", [-20.0], [])
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        nodes.append(helper.make_node("AveragePool", ["green"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        # [1, 1, h, w] -> [h * w, 1] cells, then two anchors per cell (consecutive)
        nodes.append(helper.make_node("Transpose", [f"pool{s}"], [f"t{s}"], perm=[0, 2, 3, 1]))
        const(f"shape{s}", [], [0])
        inits[-1] = helper.make_tensor(f"shape{s}", TensorProto.INT64, [2], [-1, 1])
        nodes.append(helper.make_node("Reshape", [f"t{s}", f"shape{s}"], [f"cells{s}"]))
        inits.append(helper.make_tensor(f"rep{s}", TensorProto.INT64, [2], [1, 2]))
        nodes.append(helper.make_node("Tile", [f"cells{s}", f"rep{s}"], [f"cells2_{s}"]))
        nodes.append(helper.make_node("Reshape", [f"cells2_{s}", f"shape{s}"], [f"anchors{s}"]))
        if s == FACE_CELL:
            nodes.append(helper.make_node("Sub", [f"anchors{s}", "half"], [f"c{s}"]))
            if burn_gflops:
                nodes.append(helper.make_node("Mul", [f"c{s}", "ten"], [f"lb{s}"]))
                burn = _burn_branch(nodes, inits, "input.1", 640, burn_gflops, "det_burn")
                nodes.append(helper.make_node("Add", [f"lb{s}", burn], [f"l{s}"]))
            else:
                nodes.append(helper.make_node("Mul", [f"c{s}", "ten"], [f"l{s}"]))
        else:  # other strides never fire
            nodes.append(helper.make_node("Mul", [f"anchors{s}", "ten"], [f"z{s}"]))
            nodes.append(helper.make_node("Mul", [f"z{s}", "ten"], [f"zz{s}"]))
            nodes.append(helper.make_node("Sub", [f"zz{s}", f"zz{s}"], [f"zero{s}"]))
            nodes.append(helper.make_node("Add", [f"zero{s}", "neg"], [f"l{s}"]))
        nodes.append(helper.make_node("Sigmoid", [f"l{s}"], [f"score_{s}"]))
        # constant distances (in units of the stride) broadcast to every anchor
        zero_col = f"zc{s}"
        nodes.append(helper.make_node("Sub", [f"anchors{s}", f"anchors{s}"], [zero_col]))
        # anchors sit at the cells' top-left corners; the face is centred on the cell
        half_cell = FACE_CELL / 2
        near, far = (BOX_HALF - half_cell) / s, (BOX_HALF + half_cell) / s
        const(f"box{s}", [near, near, far, far], [1, 4])
        nodes.append(helper.make_node("Add", [zero_col, f"box{s}"], [f"bbox_{s}"]))
        const(f"kpsv{s}", ((LANDMARK_OFFSETS + half_cell) / s).ravel(), [1, 10])
        nodes.append(helper.make_node("Add", [zero_col, f"kpsv{s}"], [f"kps_{s}"]))
        for kind in outputs:
            outputs[kind].append(f"{kind}_{s}")
    out_names = outputs["score"] + outputs["bbox"] + outputs["kps"]
    widths = {"score": 1, "bbox": 4, "kps": 10}
    graph_outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", widths[name.split("_")[0]]]) for name in out_names
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        graph_outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _pooled_projection_model(
    name: str,
    size: int,
    pool: int,
    out_dim: int,
    seed: int,
    scale: float = 1.0,
    ignore_centre: bool = False,
    burn_gflops: float = 0.0,
):
    """input [N, 3, size, size] -> AveragePool(pool) -> flatten -> fixed random projection.

    ``ignore_centre`` zeroes the weights of the middle of the crop, where every painted
    face carries the same green marker, so embeddings depend on the identity texture.
    """
    from onnx import TensorProto, helper

    side = size // pool
    cells = 3 * side**2
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, side, side, out_dim)) * scale / np.sqrt(cells)
    if ignore_centre:
        lo, hi = int(side * 0.22), int(side * 0.78) + 1
        keep = np.ones((side, side), dtype=bool)
        keep[lo:hi, lo:hi] = False
        # zero-sum per channel over the kept cells: a crop's overall colour cast adds nothing,
        # so unrelated faces give near-orthogonal embeddings
        weight[:, keep] -= weight[:, keep].mean(axis=1, keepdims=True)
        weight[:, ~keep] = 0.0
    weight = weight.reshape(cells, out_dim).astype(np.float32)
    inits = [helper.make_tensor("proj", TensorProto.FLOAT, weight.shape, weight.ravel())]
    nodes = [
        helper.make_node(
            "AveragePool", ["input.1"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool], name="pool"
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "proj"], ["out" if not burn_gflops else "projected"], name="fc"),
    ]
    if burn_gflops:
        burn = _burn_branch(nodes, inits, "input.1", size, burn_gflops, f"{name}_burn")
        nodes.append(helper.make_node("Unsqueeze", [burn, "burn_axes"], ["burn_col"], name="burn_col"))
        inits.append(helper.make_tensor("burn_axes", TensorProto.INT64, [1], [0]))
        nodes.append(helper.make_node("Add", ["projected", "burn_col"], ["out"], name="burn_add"))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# Compute of the real antelopev2 models (GFLOPs per run at their input size), for
# compute-matched stand-ins: SCRFD-10G at 640 px, glintr100 = iresnet100 at 112 px,
# 1k3d68 (ResNet-50-class 3D landmarks at 192 px), 2d106det (MobileNet at 192 px),
# genderage (tiny CNN at 96 px).
ANTELOPEV2_GFLOPS = {
    "scrfd_10g_bnkps.onnx": 10.0,
    "glintr100.onnx": 24.2,
    "1k3d68.onnx": 4.1,
    "2d106det.onnx": 0.47,
    "genderage.onnx": 0.03,
}


def build_tiny_antelopev2(models_root: str | Path, compute_scale: float = 0.0) -> Path:
    """Write ``models_root/models/antelopev2/*.onnx``; returns the antelopev2 folder.

    ``compute_scale > 0`` adds zero-weighted convolution branches so each model costs
    ``compute_scale`` x the real model's GFLOPs (:data:`ANTELOPEV2_GFLOPS`) with the same outputs.
    """
    import onnx

    folder = Path(models_root) / "models" / "antelopev2"
    folder.mkdir(parents=True, exist_ok=True)
    burn = {name: compute_scale * g for name, g in ANTELOPEV2_GFLOPS.items()}
    models = {
        "scrfd_10g_bnkps.onnx": _detector_model(burn["scrfd_10g_bnkps.onnx"]),
        "glintr100.onnx": _pooled_projection_model(
            "tiny_glint", 112, 4, 512, seed=1, scale=8.0, ignore_centre=True, burn_gflops=burn["glintr100.onnx"]
        ),
        "1k3d68.onnx": _pooled_projection_model(
            "tiny_1k3d68", 192, 8, 3309, seed=2, scale=0.1, burn_gflops=burn["1k3d68.onnx"]
        ),
        "2d106det.onnx": _pooled_projection_model(
            "tiny_2d106", 192, 8, 212, seed=3, scale=0.1, burn_gflops=burn["2d106det.onnx"]
        ),
        "genderage.onnx": _pooled_projection_model(
            "tiny_genderage", 96, 8, 3, seed=4, scale=0.1, burn_gflops=burn["genderage.onnx"]
        ),
    }
    for name, model in models.items():
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / name))
    return folder


def remove_green(image: np.ndarray) -> np.ndarray:
    """A copy of an RGB photo the tiny detector sees no face in (green never exceeds red and blue)."""
    out = image.copy()
    out[..., 1] = np.minimum(out[..., 0], out[..., 2])
    return out


def paint_face(canvas: np.ndarray, cell_x: int, cell_y: int, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a face at stride-32 cell (cell_x, cell_y) of a 640x640 RGB canvas.

    Returns the box and landmarks the tiny detector reports for it.
    """
    cx, cy = cell_x * FACE_CELL + FACE_CELL / 2, cell_y * FACE_CELL + FACE_CELL / 2
    rng = np.random.default_rng(1000 + identity)
    x0, y0 = int(cx - BOX_HALF), int(cy - BOX_HALF)
    texture = rng.integers(20, 200, (int(2 * BOX_HALF), int(2 * BOX_HALF), 3), dtype=np.uint8)
    texture[..., 1] = np.minimum(texture[..., 0], texture[..., 2])  # green never dominates: no false marker
    canvas[y0 : y0 + texture.shape[0], x0 : x0 + texture.shape[1]] = texture
    m0 = cell_x * FACE_CELL, cell_y * FACE_CELL
    canvas[m0[1] : m0[1] + FACE_CELL, m0[0] : m0[0] + FACE_CELL] = (0, 255, 0)
    box = np.array([cx - BOX_HALF, cy - BOX_HALF, cx + BOX_HALF, cy + BOX_HALF], dtype=np.float32)
    return box, (LANDMARK_OFFSETS + np.array([cx, cy], dtype=np.float32)).astype(np.float32)


def make_face_image(
    cells: list[tuple[int, int]], identities: list[int] | None = None, seed: int = 0, size: int = 640
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``size x size`` RGB image with faces at the given stride-32 cells.

    Returns (image, boxes [n,4], landmarks [n,5,2]) as the tiny detector reports them when
    ``size`` is 640 (for other sizes they scale by ``size / 640``).
    """
    rng = np.random.default_rng(seed)
    canvas = rng.integers(60, 180, (640, 640, 3), dtype=np.uint8)
    canvas[..., 1] = np.minimum(canvas[..., 0], canvas[..., 2])
    identities = identities if identities is not None else list(range(len(cells)))
    boxes, marks = [], []
    for (cx, cy), ident in zip(cells, identities):
        box, lm = paint_face(canvas, cx, cy, ident)
        boxes.append(box)
        marks.append(lm)
    boxes_arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    marks_arr = np.array(marks, dtype=np.float32).reshape(-1, 5, 2)
    if size != 640:
        from PIL import Image

        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.NEAREST))
        boxes_arr *= size / 640
        marks_arr *= size / 640
    return canvas, boxes_arr, marks_arr
