"""The comfy benchmark's step cost (tests/bench/bench_comfy.py): time inside the pack's code is exclusive of the
ComfyUI calls it makes, so whole >= inside and the cost whole / (whole - inside) is >= 1 by construction."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_comfy import PackClock, spread  # noqa: E402


def test_nested_regions_are_charged_once_to_their_own_side():
    clock = PackClock()

    def block(args):  # ComfyUI's original block
        time.sleep(0.03)
        return args

    def block_patch(args):  # the pack's patch around it
        time.sleep(0.01)
        return clock.region("comfy", block)(args)

    def forward(x):  # ComfyUI's forward, calling the patched blocks
        time.sleep(0.02)
        return clock.region("pack", block_patch)(clock.region("pack", block_patch)(x))

    def wrapper(x):  # the pack's diffusion-model wrapper around the forward
        time.sleep(0.01)
        return clock.region("comfy", forward)(x)

    for _ in range(3):
        assert clock.region("pack", wrapper)(5) == 5
    assert len(clock.steps) == 3  # one per outermost call
    for whole, inside in clock.steps:
        assert 0.11 <= whole < 0.5 and 0.03 <= inside < whole  # pack: 0.01 + 2 x 0.01; comfy: 0.02 + 2 x 0.03
        assert inside < 0.5 * whole
    costs = [whole / (whole - inside) for whole, inside in clock.steps]
    median, q1, q3, low, high = spread(costs)
    assert 1.0 <= low <= q1 <= median <= q3 <= high


def test_a_step_with_no_time_inside_costs_exactly_one():
    clock = PackClock()
    clock.region("pack", lambda: clock.region("comfy", time.sleep)(0.01))()
    ((whole, inside),) = clock.steps
    assert inside < 0.005 and whole / (whole - inside) >= 1.0
