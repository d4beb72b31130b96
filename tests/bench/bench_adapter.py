"""Adapter benchmark: mask building and per-forward overhead, ours vs the reference's way.

Measured side by side in one run (interleaved repetitions, minimum taken):

(a) mask build at 1024x1024 with 4 persons: the reference's Python loops over heads and
    tokens into ``[B, heads, L, n * id_len]`` bool masks for both branches, vs our
    vectorised layout + token selection (``[B, L, n]``, O(L)); also their memory.
(b) adapter overhead per transformer forward, as % of the base FLUX blocks' time, at
    hidden 1024, a 1024x1024 image (4096 image tokens) and 2 persons whose boxes cover
    about 10% of the image: ours (only covered tokens) vs the reference's dense masked
    attention over all tokens (masks prebuilt, which favours the reference).

Ends with exactly one line:
``adapter bench: mask build <N>x faster, overhead <X>% vs dense <Y>%``

    .venv/bin/python tests/bench/bench_adapter.py [--hidden 1024] [--double 1] [--single 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from support.golden import position_ids  # noqa: E402
from support.reference_flux import _perceiver_ca, reference_mask  # noqa: E402
from withanyone_core.adapter import AdapterConfig, IdentityAdapter  # noqa: E402
from withanyone_core.attention import select_tokens  # noqa: E402
from withanyone_core.hosts.diffusers import attach_adapter  # noqa: E402
from withanyone_core.layout import TokenGrid, build_layout  # noqa: E402

logger = logging.getLogger("bench_adapter")

SIZE = 1024
FOUR_BOXES = [[60, 80, 300, 380], [330, 60, 560, 340], [590, 100, 820, 390], [840, 70, 1010, 330]]
# two faces covering ~10% of a 1024x1024 image
TWO_BOXES = [[160, 200, 384, 424], [608, 180, 832, 404]]


def _timed(fn, reps):
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_masks(reps: int) -> tuple[float, float, int, int]:
    heads, grid = 24, TokenGrid.for_pixels(SIZE, SIZE, padded=False)

    def reference():
        arc = reference_mask([FOUR_BOXES], SIZE, SIZE, 8, heads, 4)
        sig = reference_mask([FOUR_BOXES], SIZE, SIZE, 264, heads, 4)
        return arc, sig

    def ours():
        layout = build_layout([FOUR_BOXES], grid, 4, 1)
        return layout, select_tokens(layout)

    ref_time = _timed(reference, max(1, reps // 2))
    our_time = _timed(ours, reps * 10)
    arc, sig = reference()
    layout, sel = ours()
    ref_bytes = arc.numel() * arc.element_size() + sig.numel() * sig.element_size()
    our_bytes = sum(t.numel() * t.element_size() for t in (layout.allowed, sel.index, sel.valid, sel.allowed))
    return ref_time, our_time, ref_bytes, our_bytes


class DenseReferenceHooks:
    """The reference's way inside the same diffusers model: dense masks, all tokens."""

    def __init__(self, transformer, adapter: IdentityAdapter, arcface, siglip, boxes):
        self.adapter = adapter
        self.sd = adapter.state_dict()
        self.heads = adapter.config.num_heads
        self.arcface, self.siglip = arcface, siglip
        n = arcface.shape[1]
        self.arc_mask = reference_mask(boxes, SIZE, SIZE, 8, self.heads, n)
        self.sig_mask = reference_mask(boxes, SIZE, SIZE, 264, self.heads, n)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        self.hooks = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]
        self.tokens = None

    def _hook(self, index):
        def hook(module, args, output):
            if index == 0:  # identities projected once per forward, as in the reference
                self.tokens = self.adapter.encode_identities(self.arcface, self.siglip)
            txt, img = output
            res = _perceiver_ca(self.sd, f"ipa_arc.{index}", self.tokens.arc, img, self.arc_mask, self.heads)
            res = res + _perceiver_ca(self.sd, f"ipa_sig.{index}", self.tokens.sig, img, self.sig_mask, self.heads)
            return txt, img + res

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def bench_overhead(hidden: int, n_double: int, n_single: int, reps: int) -> tuple[float, float, float, float]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    heads = hidden // 128
    transformer = FluxTransformer2DModel(
        in_channels=64,
        num_layers=n_double,
        num_single_layers=n_single,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        guidance_embeds=True,
    ).eval()
    adapter = IdentityAdapter(AdapterConfig(hidden, heads, n_double, n_single)).eval()
    grid = TokenGrid.for_pixels(SIZE, SIZE, padded=False)
    img_ids, txt_ids = position_ids(SIZE, SIZE, 512)
    inputs = dict(
        hidden_states=torch.randn(1, grid.num_tokens, 64),
        encoder_hidden_states=torch.randn(1, 512, 256),
        pooled_projections=torch.randn(1, 128),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )
    arcface, siglip = 20 * torch.randn(1, 2, 512), torch.randn(1, 2, 256, 768)
    covered = build_layout([TWO_BOXES], grid, 2, 1).covered.float().mean().item()
    logger.info(
        "overhead setup: hidden %d, %d+%d blocks, %d image tokens, boxes cover %.1f%% of the image",
        hidden,
        n_double,
        n_single,
        grid.num_tokens,
        100 * covered,
    )

    handle = attach_adapter(transformer, adapter)

    def base():
        transformer(**inputs)

    def ours():
        with handle.conditioning(arcface, siglip, height=SIZE, width=SIZE, boxes=[TWO_BOXES], siglip_weight=1.0):
            transformer(**inputs)

    def dense():
        hooks = DenseReferenceHooks(transformer, adapter, arcface, siglip, [TWO_BOXES])
        try:
            transformer(**inputs)
        finally:
            hooks.remove()

    times = {"base": float("inf"), "ours": float("inf"), "dense": float("inf")}
    with torch.no_grad():
        base()  # warm-up
        for rep in range(reps):
            for name, fn in (("base", base), ("ours", ours), ("dense", dense)):
                times[name] = min(times[name], _timed(fn, 1))
            logger.info("rep %d: %s", rep + 1, ", ".join(f"{k} {v:.3f}s" for k, v in times.items()))
    handle.detach()
    return times["base"], times["ours"], times["dense"], covered


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    ref_t, our_t, ref_b, our_b = bench_masks(args.reps)
    speedup = ref_t / our_t
    logger.info("mask build, 1024x1024, 4 persons, 24 heads, both branches:")
    logger.info("  reference loops: %.4f s, %.1f MB", ref_t, ref_b / 2**20)
    logger.info("  ours (layout + token selection): %.6f s, %.1f KB", our_t, our_b / 2**10)
    base, ours, dense, covered = bench_overhead(args.hidden, args.double, args.single, args.reps)
    x = 100 * (ours - base) / base
    y = 100 * (dense - base) / base
    logger.info(
        "forward: base blocks %.3f s, with our adapter %.3f s, with dense reference adapter %.3f s", base, ours, dense
    )
    logger.info("adapter bench: mask build %.0fx faster, overhead %.1f%% vs dense %.1f%%", speedup, x, y)


if __name__ == "__main__":
    main()
