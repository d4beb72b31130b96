"""ComfyUI nodes (V3 schema API). The only package that imports comfy / folder_paths / comfy_api."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

# ComfyUI imports the pack by file path as a package; the node modules reach the shared library next to them
# relatively (``..withanyone_core``), so nothing of the pack becomes a top-level name in ComfyUI's process.


class WithAnyoneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import faces, layout, loaders, metrics, routes, sampling

        loaders.register_model_folders()
        routes.register_routes()
        from . import (
            identities,  # Save / Load WithAnyone Identity
            kontext,  # FLUX.1 Kontext: WithAnyone.Ke face editing
        )
        from .schema import with_search_aliases

        return with_search_aliases(
            [
                *loaders.NODES,
                *faces.NODES,
                *layout.NODES,
                *sampling.NODES,
                *metrics.NODES,
                *kontext.NODES,
                *identities.NODES,
            ]
        )
