"""Page helpers for the browser tests of web/withanyone.js: the frontends and texts they run on, the
scripts they evaluate in the page, and the waits, screen reads and mouse drags they share."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.comfy_env import PACK_NAME, ROOT

PINNED_FRONTEND = importlib.metadata.version("comfyui-frontend-package")
# the newest comfyui-frontend-package on PyPI when the editor was written (the Vue renderer's current form)
LATEST_FRONTEND = os.environ.get("WITHANYONE_LATEST_FRONTEND", "1.58.1")
FRONTENDS = [PINNED_FRONTEND, LATEST_FRONTEND]
RENDERERS = ["classic", "vue"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GOOD_TEXT = "# two people\n0.1,0.2,0.4,0.6\n600 100 900 500"
BAD_TEXT = "0.1,0.2,0.4,0.6\n10,10,5"
# five boxes (box 5 has a colour of its own), a comment that the editor must keep, pixels and fractions
FIVE_TEXT = "# five people\n64,128,224,288\n0.3,0.15,0.45,0.35\n480,160,608,288\n600,120,740,260\n96,448,256,608"
FOUR_TEXT = "# four lines\n0.1,0.2,0.3,0.5\n0.4,0.2,0.6,0.5\n0.7,0.2,0.9,0.5"
SCREENSHOTS = ROOT / "docs"

PHOTO_COLORS = {"withanyone_test_layout_photo.png": (0, 190, 200), "withanyone_test_generated.png": (220, 120, 0)}


def post(url: str, body, path: str = "/withanyone/layout") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def error_of(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def non_finite_message(layout_module, text, width, height) -> str:
    """What a NaN/inf box must answer: the node's own parser's error where it refuses them, else the route's."""
    try:
        layout_module.parse_boxes(text, width, height)
    except ValueError as err:
        return str(err)
    return "not a finite number"


def our_nodes(url: str) -> dict:
    """This pack's nodes as the running server lists them in /object_info."""
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    assert ours, "no node of this pack in /object_info"
    return ours


SET_WIDGET = """([id, name, value]) => {
    const node = app.graph.getNodeById(id);
    const widget = node.widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value, app.canvas, node, null, null);
}"""
WIDGET_VALUE = "([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name).value"
LAYOUT_OF = "(id) => JSON.stringify(app.graph.getNodeById(id).withanyoneLayout ?? null)"
ADD_LAYOUT_NODE = """([x, y]) => {
    const node = LiteGraph.createNode("WithAnyoneLayout");
    node.pos = [x, y];
    app.graph.add(node);
    app.canvas.setDirty(true, true);
    return node.id;
}"""
# where the editor should draw each box on screen, from the canvas element's box alone (the editor fits the
# image into its canvas, centred): an independent statement of what the pixels must show
GEOMETRY = """(id) => {
    const node = app.graph.getNodeById(id);
    const editor = node.withanyoneEditor, layout = node.withanyoneLayout, canvas = editor.canvas;
    const r = canvas.getBoundingClientRect();
    const zoom = r.width / canvas.clientWidth;
    const scale = Math.min(canvas.clientWidth / layout.width, canvas.clientHeight / layout.height);
    const ox = (canvas.clientWidth - layout.width * scale) / 2, oy = (canvas.clientHeight - layout.height * scale) / 2;
    const at = (x, y) => [r.left + (ox + x * scale) * zoom, r.top + (oy + y * scale) * zoom];
    const msg = editor.message.getBoundingClientRect();
    return {boxes: layout.boxes.map(([x1, y1, x2, y2]) => [...at(x1, y1), ...at(x2, y2)]), colors: layout.colors,
            screenPerPixel: scale * zoom, frame: [...at(0, 0), ...at(layout.width, layout.height)],
            canvas: [r.left, r.top, r.right, r.bottom], message: [msg.left, msg.top, msg.right, msg.bottom],
            messageText: editor.message.textContent, messageColor: getComputedStyle(editor.message).color,
            nodePos: [...node.pos]};
}"""
# the boxes text area as the renderer shows it (classic: the widget's own element; Vue: the node's textarea)
BOXES_ELEMENT = """(id) => document.querySelector(`[data-node-id="${id}"] textarea`)
    ?? app.graph.getNodeById(id).widgets.find((w) => w.name === "boxes").element"""
BOXES_TEXTAREA = f"""(id) => {{
    const el = ({BOXES_ELEMENT})(id);
    return {{value: el.value, clientHeight: el.clientHeight, scrollHeight: el.scrollHeight}};
}}"""


# the node on screen, for the README's screenshots
NODE_CLIP = """(id) => {
    const node = app.graph.getNodeById(id);
    const vue = document.querySelector(`[data-node-id="${id}"]`);
    let x, y, w, h;
    if (vue) {
        ({x, y, width: w, height: h} = vue.getBoundingClientRect());
    } else {
        const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
        [x, y] = [r.left + (node.pos[0] + ds.offset[0]) * ds.scale, r.top + (node.pos[1] - title + ds.offset[1]) * ds.scale];
        [w, h] = [node.size[0] * ds.scale, (node.size[1] + title) * ds.scale];
    }
    return {x: Math.max(0, x - 12), y: Math.max(0, y - 12), width: w + 24, height: h + 24};
}"""


def wait_for(page, script, arg, predicate, timeout=15, what="value"):
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = page.evaluate(script, arg)
        if predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} never matched: {value}")


def wait_layout(page, node_id, predicate, timeout=15):
    """Poll node.withanyoneLayout until ``predicate(layout)`` holds; returns it."""
    return json.loads(
        wait_for(
            page,
            LAYOUT_OF,
            node_id,
            lambda v: v != "null" and predicate(json.loads(v)),
            timeout,
            "node.withanyoneLayout",
        )
    )


def open_app(browser, url, renderer="classic"):
    """The ComfyUI page in the chosen node renderer, our extension registered, an empty graph."""
    # the frontend's own setting, stored by the server before the page reads its settings
    req = urllib.request.Request(
        url + "/settings/Comfy.VueNodes.Enabled",
        data=json.dumps(renderer == "vue").encode(),
        headers={"Content-Type": "application/json"},
    )
    assert urllib.request.urlopen(req, timeout=30).status == 200
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page_errors = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(url, wait_until="domcontentloaded", timeout=90_000)
    page.wait_for_function("() => window.app?.graph && window.LiteGraph && app.extensions?.length", timeout=90_000)
    page.wait_for_function("() => app.extensions.some((e) => e.name === 'WithAnyone.Frontend')", timeout=30_000)
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") == (renderer == "vue")
    page.evaluate("() => { app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; }")
    return page, page_errors


def hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def best_match(image, x: float, y: float, color, radius: int = 3) -> float:
    """The smallest colour distance to ``color`` around screen point (x, y)."""
    best = 1e9
    for dx in range(-radius, radius + 1):
        for dy in range(-radius, radius + 1):
            px = image.getpixel((int(round(x)) + dx, int(round(y)) + dy))[:3]
            best = min(best, sum((a - b) ** 2 for a, b in zip(px, color)) ** 0.5)
    return best


def screen_rgb(page):
    from PIL import Image

    return Image.open(io.BytesIO(page.screenshot())).convert("RGB")


def assert_boxes_drawn(page, node_id):
    geometry = page.evaluate(GEOMETRY, node_id)
    image = screen_rgb(page)
    colors = [hex_rgb(c) for c in geometry["colors"]]
    for k, (x1, y1, x2, y2) in enumerate(geometry["boxes"]):
        # the middle of each edge carries the box's own colour
        for x, y in (((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)):
            assert best_match(image, x, y, colors[k]) < 45, f"box {k + 1} is not drawn at {x:.0f},{y:.0f}"
    # away from every box the image area shows no box colour
    fx1, fy1, fx2, fy2 = geometry["frame"]
    x, y = fx1 + 6, fy2 - 6
    if not any(b[0] - 4 <= x <= b[2] + 4 and b[1] - 4 <= y <= b[3] + 4 for b in geometry["boxes"]):
        assert all(best_match(image, x, y, c, radius=1) > 60 for c in colors), "a box colour outside the boxes"
    return geometry


def type_boxes(page, node_id, text):
    """Type into the boxes text area on screen (the renderer's own element), as a user does."""
    page.evaluate_handle(BOXES_ELEMENT, node_id).as_element().fill(text)


def drag(page, start, delta, steps=6):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + delta[0] / 2, start[1] + delta[1] / 2, steps=steps)
    page.mouse.move(start[0] + delta[0], start[1] + delta[1], steps=steps)
    page.mouse.up()


def box_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip() and not line.strip().startswith("#")]
