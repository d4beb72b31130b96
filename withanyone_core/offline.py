"""Imports of the Hugging Face stack that never reach the network.

bitsandbytes (0.50), on CPUs with AVX512-BF16, asks the ``kernels`` package to fetch a 4-bit CPU kernel from
the Hugging Face hub while it is imported (HF_HUB_OFFLINE no longer helps once huggingface_hub is imported).
It is imported by peft whenever it is installed, and peft by diffusers whenever *it* is installed, so
``from diffusers import FluxTransformer2DModel`` alone tried to download. Nothing in this project may
download, and nothing here uses that kernel: every import that can pull bitsandbytes in first calls
:func:`settle_bitsandbytes`, which imports it once with ``kernels`` hidden (bitsandbytes then takes its
own fallback), so the later imports find it already loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys

_ABSENT = object()


@contextlib.contextmanager
def without_hub_kernels():
    """Imports inside run with the ``kernels`` package hidden (``from kernels import ...`` raises ImportError)."""
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)  # its fallback's warning is about the hidden download, not about us
    try:
        yield
    finally:
        cpu_ops_log.setLevel(level)
        if hidden is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


def settle_bitsandbytes() -> None:
    """Import bitsandbytes now, offline, when it is installed and not yet imported (cheap after the first call)."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    with without_hub_kernels():
        import bitsandbytes  # noqa: F401
