"""Server routes for the pack's frontend extension (web/withanyone.js).

``POST /withanyone/layout`` gives the face boxes the WithAnyoneLayout node would produce for its widget
values, computed by nodes/layout.py itself (the browser draws them; it never re-implements the parsing).
"""

from __future__ import annotations

import colorsys
import logging
import math
import sys

from .layout import COLORS, PRESETS, parse_boxes, preset_boxes

logger = logging.getLogger(__name__)

LAYOUT_ROUTE = "/withanyone/layout"
# sources whose boxes exist only once the graph runs (they need the connected photo or mask)
RUN_TIME_NOTES = {
    "image": "boxes come from the layout image when the graph runs",
    "mask": "boxes come from the layout mask when the graph runs (one per white region, left to right)",
}


class LayoutRequestError(ValueError):
    """A request the node itself would refuse; the message goes back to the browser."""


def box_colors(count: int) -> list[str]:
    """One colour per box: nodes/layout.py's four COLORS first, then hues of their own for box 5 and later
    (spread by the golden angle, so neighbours never look alike)."""
    colors = ["#%02x%02x%02x" % c for c in COLORS]
    for k in range(len(colors), count):
        r, g, b = colorsys.hls_to_rgb(((k - len(COLORS)) * 0.381966 + 0.83) % 1.0, 0.6, 0.85)
        colors.append("#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255)))
    return colors


def _finite_boxes(found) -> list[list[float]]:
    """JSON has no NaN/inf: a box with one refuses the request instead of sending invalid JSON."""
    boxes = []
    for k, box in enumerate(found, 1):
        values = [float(v) for v in box]
        if not all(math.isfinite(v) for v in values):
            raise LayoutRequestError(f"box {k} has a coordinate that is not a finite number ({box}): "
                                     f"use four numbers x1,y1,x2,y2 in pixels or 0-1 fractions")
        boxes.append(values)
    return boxes


def _integer(body: dict, name: str) -> int:
    value = body.get(name)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value)):
        raise LayoutRequestError(f"{name} must be an integer, got {value!r}")
    return int(value)


def layout_response(body) -> dict:
    """The JSON answer for one request body; raises ValueError with the node's own message."""
    if not isinstance(body, dict):
        raise LayoutRequestError("expected a JSON object {width, height, source, people, boxes}")
    width, height = _integer(body, "width"), _integer(body, "height")
    if width <= 0 or height <= 0:
        raise LayoutRequestError(f"width and height must be positive, got {width}x{height}")
    source = body.get("source", "preset")
    if source == "preset":
        people = _integer(body, "people")
        if people not in PRESETS:
            raise LayoutRequestError(f"people must be 1 to {max(PRESETS)}, got {people}")
        found = preset_boxes(people, width, height)
    elif source == "text":
        text = body.get("boxes", "")
        if not isinstance(text, str):
            raise LayoutRequestError("boxes must be a string")
        found = parse_boxes(text, width, height)
    elif source in RUN_TIME_NOTES:
        return {"boxes": [], "width": width, "height": height, "colors": box_colors(0),
                "note": RUN_TIME_NOTES[source]}
    else:
        raise LayoutRequestError(f"unknown layout source {source!r}")
    boxes = _finite_boxes(found)
    return {"boxes": boxes, "width": width, "height": height, "colors": box_colors(len(boxes))}


def register_routes() -> bool:
    """Add the routes to the running ComfyUI server once; False where there is none (in-process tests)."""
    # ComfyUI's main.py imports server.py and creates the PromptServer before it loads custom nodes;
    # without one (the node tests import the pack directly) there is nothing to register with.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    routes = instance.routes
    if any(getattr(route, "path", None) == LAYOUT_ROUTE for route in routes):
        return True
    from aiohttp import web

    @routes.post(LAYOUT_ROUTE)
    async def withanyone_layout(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        try:
            return web.json_response(layout_response(body))
        except ValueError as err:
            return web.json_response({"error": str(err)}, status=400)
        except Exception as err:  # a bug here must reach the node as a message, not as an HTML error page
            logger.exception("%s failed", LAYOUT_ROUTE)
            return web.json_response({"error": f"layout preview failed: {type(err).__name__}: {err}"}, status=500)

    logger.debug("registered %s", LAYOUT_ROUTE)
    return True
