"""Developer generators (not shipped to Comfy Registry users), run as ``python -m dev.<name>``:

- :mod:`dev.build_workflows`: ``example_workflows/`` from ``tools/common/workflow_specs.py``;
- :mod:`dev.build_locales`: ``locales/`` (node texts and their translations) from a running pack's nodes.
"""
