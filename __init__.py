"""WithAnyone for ComfyUI: entry point.

ComfyUI calls ``comfy_entrypoint``; the node modules (and torch-heavy libraries such as
insightface) are imported only when ComfyUI asks for the node list, never when this
package is imported.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import WithAnyoneExtension

    return WithAnyoneExtension()
