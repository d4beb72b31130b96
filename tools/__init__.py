"""Programs for users of the pack, run from its folder as ``python -m tools.<name>``:

- :mod:`tools.demo`: ``make demo``, the pack on random-weight models in a ComfyUI of its own (from a clone);
- :mod:`tools.bench_run`: MultiID-Bench generation through a running ComfyUI's HTTP API.

:mod:`tools.common` is the code they share with the developer generators (``dev/``) and the tests: the
workflow format, the example workflows' specs, a ComfyUI server to drive, and the ComfyUI trees.
"""
