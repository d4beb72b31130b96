"""Server routes for the pack's frontend extension (web/withanyone.js).

``POST /withanyone/layout`` gives the face boxes the WithAnyoneLayout node would produce for its widget
values, computed by the same code (:mod:`withanyone_core.layout`: the browser draws them; it never
re-implements the parsing). This module does not import the node module, nor it this one.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from ..withanyone_core.layout import (
    MAX_BOXES,
    PRESETS,
    SIZE_RANGE,
    SOURCES,
    box_colors,
    layout_from_preset,
    layout_from_text,
)

logger = logging.getLogger(__name__)

LAYOUT_ROUTE = "/withanyone/layout"
# sources whose boxes exist only once the graph runs (they need the connected photo or mask)
RUN_TIME_NOTES = {
    "image": "boxes come from the layout image when the graph runs",
    "mask": "boxes come from the layout mask when the graph runs (one per white region, left to right)",
}


class LayoutRequestError(ValueError):
    """A request the node itself would refuse; the message goes back to the browser."""


class LayoutRequestTooLarge(LayoutRequestError):
    """A body above MAX_BODY_BYTES (HTTP 413)."""


# The editor sends the five widget values; its boxes text holds at most MAX_BOXES lines plus comments. 64 KiB
# is room for that many times over, and what is read, parsed and answered stays small whatever is sent.
MAX_BODY_BYTES = 64 * 1024
FIELDS = {"width": "an integer", "height": "an integer", "source": "text", "people": "an integer", "boxes": "text"}


def _shown(value) -> str:
    """A value for a message, short whatever it is (a 400-digit number, a megabyte of text)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"a number of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(body: dict, name: str, low: int, high: int, what: str | None = None) -> int:
    """``body[name]`` as an integer within low..high; a bool, text, a fraction, NaN or a 400-digit number is
    refused with the field's name (integers are compared as integers: nothing overflows)."""
    value = body.get(name)
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and value.is_integer()
    if not ok or not low <= value <= high:
        raise LayoutRequestError(f"{name} must be {what or f'an integer from {low} to {high}'}, got {_shown(value)}")
    return int(value)


def parse_request(raw: bytes) -> dict:
    """A request body -> its fields, checked against the schema before anything is computed: a JSON object with
    only the node's widget names, each of its type. Every way of being wrong is a LayoutRequestError."""
    if len(raw) > MAX_BODY_BYTES:
        raise LayoutRequestTooLarge(
            f"the request body is {len(raw)} bytes, above {MAX_BODY_BYTES}: a layout holds at most {MAX_BOXES} boxes"
        )
    try:
        body = json.loads(raw)
    except RecursionError:
        raise LayoutRequestError(
            "the request body is nested too deeply: send one JSON object {width, height, source, people, boxes}"
        ) from None
    except ValueError as err:  # includes bytes that are not UTF-8, and integers of more than 4300 digits
        raise LayoutRequestError(f"the request body is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise LayoutRequestError(
            f"expected a JSON object {{width, height, source, people, boxes}}, got {type(body).__name__}"
        )
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise LayoutRequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))[:200]}: the fields are {', '.join(FIELDS)}"
        )
    return body


def layout_response(body) -> dict:
    """The JSON answer for one request body (bytes, or the decoded object); raises LayoutRequestError with the
    node's own message."""
    if isinstance(body, (bytes, bytearray)):
        body = parse_request(bytes(body))
    if not isinstance(body, dict):
        raise LayoutRequestError(
            f"expected a JSON object {{width, height, source, people, boxes}}, got {type(body).__name__}"
        )
    width, height = (_integer(body, name, *SIZE_RANGE) for name in ("width", "height"))
    source = body.get("source", "preset")
    if not isinstance(source, str) or source not in SOURCES:
        raise LayoutRequestError(
            f"unknown layout source {_shown(source)}: use one of {', '.join(SOURCES)}"
            if isinstance(source, str)
            else f"source must be one of {', '.join(SOURCES)}, got {_shown(source)}"
        )
    people = None
    if "people" in body or source == "preset":
        people = _integer(body, "people", 1, max(PRESETS), f"1 to {max(PRESETS)}")  # the node's own range
    text = body.get("boxes", "")
    if not isinstance(text, str):
        raise LayoutRequestError(f"boxes must be text (one x1,y1,x2,y2 per line), got {_shown(text)}")
    if source not in ("preset", "text"):
        return {"boxes": [], "width": width, "height": height, "colors": box_colors(0), "note": RUN_TIME_NOTES[source]}
    try:  # the node's own Layout: its boxes are checked (finite, not inverted), so the answer is valid JSON
        layout = (
            layout_from_preset(people, width, height) if source == "preset" else layout_from_text(text, width, height)
        )
    except ValueError as err:
        raise LayoutRequestError(str(err)) from None
    boxes = [list(box) for box in layout.boxes]
    return {"boxes": boxes, "width": width, "height": height, "colors": box_colors(len(boxes))}


async def read_capped(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read no further than ``limit`` + 1 bytes (a declared or actual larger body is refused at once)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise LayoutRequestTooLarge(
            f"the request body is {declared} bytes, above {limit}: a layout holds at most {MAX_BOXES} boxes"
        )
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise LayoutRequestTooLarge(
                f"the request body is above {limit} bytes: a layout holds at most {MAX_BOXES} boxes"
            )


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
            answer = layout_response(await read_capped(request))
        except LayoutRequestTooLarge as err:
            return web.json_response({"error": str(err)}, status=413)
        except LayoutRequestError as err:
            return web.json_response({"error": str(err)}, status=400)
        except Exception as err:  # a bug here must reach the node as a message, not as an HTML error page
            logger.exception("%s failed", LAYOUT_ROUTE)
            return web.json_response({"error": f"layout preview failed: {type(err).__name__}: {err}"}, status=500)
        return web.json_response(answer)

    logger.debug("registered %s", LAYOUT_ROUTE)
    return True
