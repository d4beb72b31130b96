"""Helpers the tests share: a real ComfyUI in-process (comfy_env), ComfyUI install layouts (comfyui_install),
the golden data (golden, make_golden) and the independent reference FLUX (reference_flux)."""
