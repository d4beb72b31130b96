"""The Triton region-attention kernel equals the SDPA path.

Runs the real kernel under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess,
since the interpreter must be chosen before triton is imported; on a CUDA machine the
same checks run on the GPU via tests/bench or by setting WITHANYONE_TEST_CUDA=1.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from withanyone_core.triton_attention import region_attention_triton
    from withanyone_core.attention import region_attention

    device = {device!r}
    torch.manual_seed(0)
    worst = 0.0
    # (batch, heads, queries, persons, tokens per person, head dim)
    for b, h, s, n, t, d in [(1, 2, 37, 2, 8, 64), (2, 1, 70, 3, 264, 32), (1, 2, 16, 4, 8, 16), (2, 2, 20, 1, 264, 64)]:
        q = torch.randn(b, h, s, d, device=device)
        k = torch.randn(b, h, n * t, d, device=device)
        v = torch.randn(b, h, n * t, d, device=device)
        allowed = torch.rand(b, s, n, device=device) < 0.5
        allowed[..., 0] |= ~allowed.any(-1)  # every row sees someone, as region_attention requires
        with torch.no_grad():
            ref = region_attention(q.cpu(), k.cpu(), v.cpu(), allowed.cpu(), t)
            out = region_attention_triton(q, k, v, allowed, t, block_m=16, block_n=16)
        worst = max(worst, (out.cpu() - ref).abs().max().item())
    # the production tiles (region_attention's defaults, 64 x 64), with the real head size and token counts:
    # query blocks that end mid-tile, person boundaries inside a key tile, 264-token SigLIP persons
    for b, h, s, n, t, d in [(1, 2, 150, 2, 264, 64), (2, 1, 64, 3, 8, 64), (1, 1, 65, 4, 264, 64)]:
        q = torch.randn(b, h, s, d, device=device)
        k = torch.randn(b, h, n * t, d, device=device)
        v = torch.randn(b, h, n * t, d, device=device)
        allowed = torch.rand(b, s, n, device=device) < 0.5
        allowed[..., 0] |= ~allowed.any(-1)
        with torch.no_grad():
            ref = region_attention(q.cpu(), k.cpu(), v.cpu(), allowed.cpu(), t)
            out = region_attention_triton(q, k, v, allowed, t)  # default block_m=64, block_n=64
        worst = max(worst, (out.cpu() - ref).abs().max().item())
    # identity K/V computed once for batch 1 and broadcast to the batch (stride 0), as a sampling run passes them
    q = torch.randn(3, 2, 40, 64, device=device)
    k = torch.randn(1, 2, 2 * 264, 64, device=device).expand(3, -1, -1, -1)
    v = torch.randn(1, 2, 2 * 264, 64, device=device).expand(3, -1, -1, -1)
    allowed = torch.rand(3, 40, 2, device=device) < 0.6
    allowed[..., 1] |= ~allowed.any(-1)
    with torch.no_grad():
        ref = region_attention(q.cpu(), k.cpu().contiguous(), v.cpu().contiguous(), allowed.cpu(), 264)
        out = region_attention_triton(q, k, v, allowed, 264)
    worst = max(worst, (out.cpu() - ref).abs().max().item())
    # a query allowed to nobody gets zeros (no NaN)
    q = torch.randn(1, 1, 16, 16, device=device); k = torch.randn(1, 1, 16, 16, device=device)
    none = torch.zeros(1, 16, 2, dtype=torch.bool, device=device)
    z = region_attention_triton(q, k, k, none, 8, block_m=16, block_n=16)
    assert torch.count_nonzero(z) == 0
    print("MAXERR", worst)
    """
)


def _run(device: str, env_extra: dict) -> float:
    env = {**os.environ, **env_extra}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT), device=device)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.split("MAXERR")[1])


def test_kernel_matches_sdpa_under_interpreter():
    pytest.importorskip("triton")
    assert _run("cpu", {"TRITON_INTERPRET": "1"}) <= 1e-4


@pytest.mark.skipif(os.environ.get("WITHANYONE_TEST_CUDA") != "1", reason="set WITHANYONE_TEST_CUDA=1 on a GPU machine")
def test_kernel_matches_sdpa_on_cuda():
    assert _run("cuda", {}) <= 2e-3
