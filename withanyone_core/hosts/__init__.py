"""Hosts run the identity adapter inside a FLUX implementation (diffusers here; ComfyUI in nodes/)."""
