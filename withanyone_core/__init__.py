"""WithAnyone core library: identity adapter, layout, attention, hosts, faces, metrics.

Shared by the ComfyUI nodes (``nodes/``), the trainer (``train/``) and the tests.
Never imports ComfyUI. Heavy submodules are imported where used.
"""

__version__ = "0.1.0"
