"""Shared by the user programs (``tools/``), the developer generators (``dev/``) and the tests:

- :mod:`.workflows`: UI <-> API workflow format, checks, thumbnails;
- :mod:`.workflow_specs`: the example workflows' specs (``example_workflows/`` is generated from them);
- :mod:`.comfy_server`: boot a ComfyUI with the pack and queue prompts over HTTP;
- :mod:`.get_comfyui`: the ComfyUI source trees for the demo and the tests (``python -m tools.common.get_comfyui``).
"""
