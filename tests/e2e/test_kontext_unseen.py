"""tests/e2e/test_kontext_golden.py must pass on Kontext golden data it has never seen, and fail on wrong data.

The data is written by an independent re-statement of the authors' Kontext model
(``withanyone_kontext_e/flux/model.py``): FLUX from tests/support/reference_flux.py (itself checked
against the base golden outputs), one image stream [target, reference] with the ids given,
the ArcFace-only identity tokens, the Kontext box rule written as the authors' loops
(``int(x1) // 16``, ``ceil(int(x2) / 16)``), and the residual on the first L tokens after
every block. The re-statement is first checked against the shipped ``*_ke`` cases. The
unseen set has another model size, non-square targets, references larger, smaller and of
another aspect than the target, batches of 2-3 with different boxes per image, 3-4 persons,
overlapping, fractional and partly outside boxes, a partial id weight, no layout and no
identities. The golden test then runs in a subprocess pointed at that folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from support import reference_flux as ref
from support.golden import DEFAULT_GOLDEN_DIR
from support.make_golden import UNSEEN_CONFIG  # the block-parity sets' unseen FLUX: Kontext runs on it too
from withanyone_core.testing.bfl import bfl_shapes

TESTS = Path(__file__).resolve().parent


def _case(h, w, rh, rw, batch, n, bboxes, id_weight=1.0, with_identities=True, text_tokens=5):
    return {
        "height": h,
        "width": w,
        "ref_height": rh,
        "ref_width": rw,
        "batch": batch,
        "num_ids": n,
        "bboxes": bboxes,
        "id_weight": id_weight,
        "use_mask": bboxes is not None,
        "with_identities": with_identities,
        "text_tokens": text_tokens,
        "image_tokens": (h // 16) * (w // 16),
        "ref_tokens": (rh // 16) * (rw // 16),
        "guidance": 4.0,
    }


UNSEEN_CASES = {
    # two images, three persons each, other boxes per image: overlapping, fractional, partly outside
    "batch2_three_ids_overlap_fractional": _case(
        192,
        320,
        160,
        224,
        2,
        3,
        [
            [[-12.5, 10.2, 100.7, 120.9], [80.3, 30.0, 200.0, 150.5], [190.9, -8.0, 340.0, 175.3]],
            [[20.0, 40.0, 140.0, 180.0], [130.6, 20.4, 250.2, 140.8], [240.0, 60.0, 319.9, 191.99]],
        ],
    ),
    "batch3_four_ids_ref_larger": _case(
        256,
        192,
        320,
        288,
        3,
        4,
        [[[0, 0, 96, 120], [96, 0, 192, 120], [0, 128, 96, 256], [90, 125, 192, 256]]] * 3,
        id_weight=0.7,
    ),
    "one_id_tall_target_wide_ref": _case(288, 176, 144, 272, 1, 1, [[[30.6, 47.1, 150.4, 200.8]]]),
    "three_ids_no_layout_batch2": _case(208, 208, 208, 208, 2, 3, None),
    "no_identities_batch2": _case(176, 240, 224, 160, 2, 0, None, with_identities=False),
}


def kontext_mask(batch_boxes, height, width, id_len, heads, num_ids):
    """The authors' Kontext mask, loop for loop: ``[B, heads, L, n * id_len]``."""
    cols, rows = (width // 8) // 2, (height // 8) // 2
    mask = torch.zeros(len(batch_boxes), heads, rows * cols, num_ids * id_len, dtype=torch.bool)
    for b, boxes in enumerate(batch_boxes):
        for person, (x1, y1, x2, y2) in enumerate(boxes[:num_ids]):
            c0, r0 = max(0, int(x1) // 16), max(0, int(y1) // 16)
            c1, r1 = min(cols, math.ceil(int(x2) / 16)), min(rows, math.ceil(int(y2) / 16))
            for r in range(r0, r1):
                for c in range(c0, c1):
                    for h in range(heads):
                        mask[b, h, r * cols + c, person * id_len : (person + 1) * id_len] = True
    return mask


def kontext_reference(state, cfg, t, case):
    """The authors' Kontext forward (target + reference stream, ArcFace-only adapter) from a state dict."""
    model = ref.ReferenceWithAnyone(state, cfg)
    sd = state
    img, cond = t["img"], t["img_cond_seq"]
    b, length = img.shape[:2]
    ids = torch.cat([t["txt_ids"], t["img_ids"], t["img_cond_seq_ids"]], dim=1)
    pe = ref._pos_embed(ids, cfg["axes_dim"], cfg["theta"])
    x = ref._linear(sd, "img_in", torch.cat([img, cond], dim=1))
    vec = ref._mlp_embed(sd, "time_in", ref._timestep_embedding(t["timesteps"]))
    vec = vec + ref._mlp_embed(sd, "guidance_in", ref._timestep_embedding(t["guidance"]))
    vec = vec + ref._mlp_embed(sd, "vector_in", t["y"])
    txt = ref._linear(sd, "txt_in", t["txt"])
    use_ip = case["with_identities"] and case["num_ids"] > 0
    heads = sd["ipa.0.to_q.weight"].shape[0] // 64
    if use_ip:
        n = case["num_ids"]
        tokens = ref._projector(sd, "arcface_in", t["arcface_embeddings"]).reshape(b, n * 8, cfg["hidden_size"])
        mask = (
            kontext_mask(case["bboxes"], case["height"], case["width"], 8, heads, n)
            if case["bboxes"] is not None and case["use_mask"]
            else None
        )

    def identity(idx, target):
        out = ref._perceiver_ca(sd, f"ipa.{idx}", tokens, target, mask, heads)
        return case["id_weight"] * torch.nan_to_num(out)  # an all-False mask row attends to nothing

    block = 0
    for i in range(cfg["depth"]):
        x, txt = model._double(i, x, txt, vec, pe)
        if use_ip:
            x = torch.cat([x[:, :length] + identity(block, x[:, :length]), x[:, length:]], dim=1)
        block += 1
    text_len = txt.shape[1]
    x = torch.cat([txt, x], dim=1)
    for i in range(cfg["depth_single_blocks"]):
        x = model._single(i, x, vec, pe)
        if use_ip:
            target = x[:, text_len : text_len + length]
            x = torch.cat([x[:, :text_len], target + identity(block, target), x[:, text_len + length :]], dim=1)
        block += 1
    x = x[:, text_len:]
    shift, scale = ref._linear(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=1)
    x = (1 + scale[:, None, :]) * ref._layer_norm(x) + shift[:, None, :]
    return ref._linear(sd, "final_layer.linear", x)


def _grid_ids(b, rows, cols, index):
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(1, rows * cols, 3).repeat(b, 1, 1)


def _random_state(cfg, g):
    state = {}
    shapes = {k: v for k, v in bfl_shapes(cfg).items() if not k.startswith(("ipa_", "arcface_in", "siglip_in"))}
    d, blocks = cfg["hidden_size"], cfg["depth"] + cfg["depth_single_blocks"]
    inner = cfg["num_heads"] * 64
    for i in range(blocks):
        shapes.update(
            {
                f"ipa.{i}.norm1.weight": (d,),
                f"ipa.{i}.norm1.bias": (d,),
                f"ipa.{i}.norm2.weight": (d,),
                f"ipa.{i}.norm2.bias": (d,),
                f"ipa.{i}.to_q.weight": (inner, d),
                f"ipa.{i}.to_kv.weight": (2 * inner, d),
                f"ipa.{i}.to_out.weight": (d, inner),
            }
        )
    for prefix, width in (("arcface_in", 512), ("siglip_in", 768)):  # siglip_in as released: present, unused
        shapes.update(
            {
                f"{prefix}.0.weight": (4 * d, width),
                f"{prefix}.0.bias": (4 * d,),
                f"{prefix}.2.weight": (4 * d,),
                f"{prefix}.2.bias": (4 * d,),
                f"{prefix}.3.weight": (8 * d, 4 * d),
                f"{prefix}.3.bias": (8 * d,),
            }
        )
    for name, shape in shapes.items():
        is_norm = len(shape) == 1 and (name.endswith("scale") or ".norm" in name or ".2." in name)
        if is_norm:
            base = 1.0 if name.endswith(("weight", "scale")) else 0.0
            state[name] = base + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            state[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            gain = 3.0 if name.endswith("to_out.weight") else 1.0  # a clear identity effect
            state[name] = gain * torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return state


def write_kontext_set(out_dir: Path, name: str, cfg: dict, cases: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = _random_state(cfg, g)
    tensors = {}
    for case_name, c in cases.items():
        b, n = c["batch"], c["num_ids"]
        rows, cols, rr, rc = c["height"] // 16, c["width"] // 16, c["ref_height"] // 16, c["ref_width"] // 16
        t = {
            "img": torch.randn(b, rows * cols, cfg["in_channels"], generator=g),
            "img_ids": _grid_ids(b, rows, cols, 0),
            "img_cond_seq": torch.randn(b, rr * rc, cfg["in_channels"], generator=g),
            "img_cond_seq_ids": _grid_ids(b, rr, rc, 1),
            "txt": torch.randn(b, c["text_tokens"], cfg["context_in_dim"], generator=g),
            "txt_ids": torch.zeros(b, c["text_tokens"], 3),
            "y": torch.randn(b, cfg["vec_in_dim"], generator=g),
            "timesteps": torch.rand(b, generator=g),
            "guidance": torch.full((b,), c["guidance"]),
        }
        if c["with_identities"]:
            t["arcface_embeddings"] = 20 * torch.randn(b, n, 512, generator=g)
        if c["bboxes"] is not None:
            t["mask"] = kontext_mask(c["bboxes"], c["height"], c["width"], 8, 1, n)[:, 0]
        with torch.no_grad():
            t["output"] = kontext_reference(state, cfg, t, c)
        tensors.update({f"{case_name}.{k}": v.contiguous() for k, v in t.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / f"{name}_ke_model.safetensors"))
    save_file(tensors, str(out_dir / f"{name}_ke.safetensors"))
    spec = {"model": "withanyone_kontext", "config": cfg, "seed": seed, "cases": cases}
    (out_dir / f"{name}_ke.json").write_text(json.dumps(spec, indent=1))
    return tensors


def _run_golden_test(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WITHANYONE_GOLDEN_DIR": str(folder)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "test_kontext_golden.py"), "-q", "-p", "no:cacheprovider"],
        cwd=TESTS.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_reference_restatement_reproduces_the_shipped_kontext_cases():
    spec = json.loads((DEFAULT_GOLDEN_DIR / "withanyone_tiny_ke.json").read_text())
    state = load_file(str(DEFAULT_GOLDEN_DIR / "withanyone_tiny_ke_model.safetensors"))
    tensors = load_file(str(DEFAULT_GOLDEN_DIR / "withanyone_tiny_ke.safetensors"))
    for name, case in spec["cases"].items():
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        with torch.no_grad():
            out = kontext_reference(state, spec["config"], t, case)
        assert (out - t["output"]).abs().max() <= 1e-4, name
        if "mask" in t:
            mask = kontext_mask(case["bboxes"], case["height"], case["width"], 8, 1, case["num_ids"])[:, 0]
            assert torch.equal(mask, t["mask"].bool()), name


def test_identities_matter_in_the_unseen_set(tmp_path):
    """The unseen cases can tell a missing or misplaced residual apart (it moves the output clearly)."""
    cases = {"batch3_four_ids_ref_larger": UNSEEN_CASES["batch3_four_ids_ref_larger"]}
    tensors = write_kontext_set(tmp_path, "probe", UNSEEN_CONFIG, cases, seed=3)
    state = load_file(str(tmp_path / "probe_ke_model.safetensors"))
    case = dict(cases["batch3_four_ids_ref_larger"], with_identities=False)
    t = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    with torch.no_grad():
        without = kontext_reference(state, UNSEEN_CONFIG, t, case)
    length = case["image_tokens"]
    assert (without[:, :length] - t["output"][:, :length]).abs().max() > 0.05


@pytest.mark.slow
def test_kontext_golden_test_passes_on_unseen_data(tmp_path):
    write_kontext_set(tmp_path, "withanyone_unseen", UNSEEN_CONFIG, UNSEEN_CASES, seed=7)
    result = _run_golden_test(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(rf"\b{len(UNSEEN_CASES) + 1} passed\b", result.stdout), result.stdout[-2000:]


@pytest.mark.slow
def test_kontext_golden_test_fails_on_perturbed_data(tmp_path):
    """Not vacuous: a 1e-3 change of one output, or a box moved by one token, must fail."""
    cases = {
        "out": UNSEEN_CASES["one_id_tall_target_wide_ref"],
        "box": UNSEEN_CASES["batch2_three_ids_overlap_fractional"],
    }
    write_kontext_set(tmp_path, "withanyone_bad", UNSEEN_CONFIG, cases, seed=5)
    path = tmp_path / "withanyone_bad_ke.safetensors"
    tensors = load_file(str(path))
    tensors["out.output"][0, 3, 5] += 1e-3
    save_file(tensors, str(path))
    spec_path = tmp_path / "withanyone_bad_ke.json"
    spec = json.loads(spec_path.read_text())
    spec["cases"]["box"]["bboxes"][1][0][0] += 16.0  # the stored mask and output no longer match these boxes
    spec_path.write_text(json.dumps(spec))
    result = _run_golden_test(tmp_path)
    assert re.search(r"\b2 failed, 1 passed\b", result.stdout), result.stdout[-3000:]
