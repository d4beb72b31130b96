"""The frontend extension (web/withanyone.js) in a real ComfyUI server and a real browser (Chromium).

One server boot for the module: the /withanyone/layout route is tested directly (urllib), then the
page is driven through the frontend's own objects (app, LiteGraph) with Playwright.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_env import PACK_NAME, import_comfyui, import_pack
from comfy_server import ComfyServer  # tools/, put on sys.path by comfy_env

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
GOOD_TEXT = "# two people\n0.1,0.2,0.4,0.6\n600 100 900 500"
BAD_TEXT = "0.1,0.2,0.4,0.6\n10,10,5"


@pytest.fixture(scope="module")
def layout_module():
    """nodes/layout.py as the server imports it: the single source of the boxes."""
    import_comfyui()
    import_pack()
    return importlib.import_module("withanyone_pack.nodes.layout")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_web")
    # a returning user: no template browser over the canvas on the first page load
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    with ComfyServer(base) as comfy:
        yield comfy.url, base


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/withanyone/layout", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _error_of(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def test_layout_route(server, layout_module):
    url, _ = server
    status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": GOOD_TEXT})
    assert status == 200
    assert answer["boxes"] == [list(b) for b in layout_module.parse_boxes(GOOD_TEXT, 1024, 768)]
    assert (answer["width"], answer["height"]) == (1024, 768)
    assert answer["colors"] == ["#%02x%02x%02x" % c for c in layout_module.COLORS]
    # the /api prefix the frontend's api.fetchApi uses reaches the same route
    status, answer = _post(url + "/api", {"width": 512, "height": 1024, "source": "preset", "people": 3, "boxes": ""})
    assert status == 200 and answer["boxes"] == [list(b) for b in layout_module.preset_boxes(3, 512, 1024)]
    status, answer = _post(url, {"width": 1024, "height": 1024, "source": "image", "people": 2, "boxes": ""})
    assert status == 200 and answer["boxes"] == [] and "layout image" in answer["note"]

    status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": BAD_TEXT})
    assert status == 400 and answer["error"] == _error_of(layout_module.parse_boxes, BAD_TEXT, 1024, 768)
    status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": "\n# none"})
    assert status == 400 and answer["error"].startswith("no boxes given")
    status, answer = _post(url, {"width": 1024, "height": 768, "source": "preset", "people": 7, "boxes": ""})
    assert status == 400 and "people must be 1 to 4" in answer["error"]
    status, answer = _post(url, {"width": "wide", "height": 768, "source": "preset", "people": 1, "boxes": ""})
    assert status == 400 and "width must be an integer" in answer["error"]
    status, answer = _post(url, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


SET_WIDGET = """([id, name, value]) => {
    const node = app.graph.getNodeById(id);
    const widget = node.widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value, app.canvas, node, null, null);
}"""
LAYOUT_OF = "(id) => JSON.stringify(app.graph.getNodeById(id).withanyoneLayout ?? null)"


def _wait_layout(page, node_id, predicate, timeout=15):
    """Poll node.withanyoneLayout until ``predicate(layout)`` holds; returns it."""
    deadline = time.time() + timeout
    layout = None
    while time.time() < deadline:
        layout = json.loads(page.evaluate(LAYOUT_OF, node_id))
        if layout is not None and predicate(layout):
            return layout
        time.sleep(0.1)
    raise AssertionError(f"node.withanyoneLayout never matched: {layout}")


def _open_app(browser, url):
    """The ComfyUI page with our extension registered and an empty graph; returns (page, page errors)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page_errors = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function("() => window.app?.graph && window.LiteGraph && app.extensions?.length", timeout=60_000)
    page.wait_for_function("() => app.extensions.some((e) => e.name === 'WithAnyone.Frontend')", timeout=30_000)
    page.evaluate("() => { app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; }")
    return page, page_errors


def test_frontend_extension_in_chromium(server, browser, layout_module, tmp_path):
    url, base = server
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page_errors = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    ours = []
    page.on("console", lambda msg: ours.append(msg.text) if "withanyone" in msg.text.lower() else None)
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function("() => window.app?.graph && window.LiteGraph && app.extensions?.length", timeout=60_000)
    page.wait_for_function("() => app.extensions.some((e) => e.name === 'WithAnyone.Frontend')", timeout=30_000)
    extensions = page.evaluate("() => fetch('/extensions').then((r) => r.json())")
    assert f"/extensions/{PACK_NAME}/withanyone.js" in extensions
    page.evaluate("() => { app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; }")

    node_id = page.evaluate("""() => {
        const node = LiteGraph.createNode("WithAnyoneLayout");
        node.pos = [120, 160];
        app.graph.add(node);
        app.canvas.setDirty(true, true);
        return node.id;
    }""")
    # the default widgets (preset, 2 people, 1024x1024) are previewed without any change
    layout = _wait_layout(page, node_id, lambda lay: lay["boxes"])
    assert layout["boxes"] == [list(b) for b in layout_module.preset_boxes(2, 1024, 1024)]

    page.evaluate(SET_WIDGET, [node_id, "height", 768])
    page.evaluate(SET_WIDGET, [node_id, "source", "text"])
    page.evaluate(SET_WIDGET, [node_id, "boxes", GOOD_TEXT])
    expected = [list(b) for b in layout_module.parse_boxes(GOOD_TEXT, 1024, 768)]
    layout = _wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    assert layout["error"] is None and (layout["width"], layout["height"]) == (1024, 768)
    page.screenshot(path=str(tmp_path / "layout_preview.png"))

    page.evaluate(SET_WIDGET, [node_id, "boxes", BAD_TEXT])
    message = _error_of(layout_module.parse_boxes, BAD_TEXT, 1024, 768)
    layout = _wait_layout(page, node_id, lambda lay: lay.get("error"))
    assert layout["error"] == message and layout["boxes"] == []
    page.screenshot(path=str(tmp_path / "layout_error.png"))

    # the preview widget stays out of the prompt and the saved workflow
    prompt = page.evaluate("() => app.graphToPrompt().then((p) => p.output)")
    assert set(prompt[str(node_id)]["inputs"]) == {"width", "height", "source", "people", "boxes"}
    assert prompt[str(node_id)]["inputs"]["boxes"] == BAD_TEXT
    saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", node_id)
    assert saved == [1024, 768, "text", 2, BAD_TEXT]

    # identity metrics: an "executed" message as the server sends it reaches the node's text box and meter
    metrics = page.evaluate("""() => {
        const node = LiteGraph.createNode("WithAnyoneIdentityMetrics");
        node.pos = [620, 160];
        app.graph.add(node);
        const id = String(node.id);
        const text = "image 1 person 1: Sim(Ref) 0.612, Sim(GT) 0.401, CP +0.300\\n"
                   + "image 1 person 2: Sim(Ref) 0.5, Sim(GT) 0.6, CP -0.100";
        window.comfyAPI.api.api.dispatchCustomEvent("executed", {node: id, display_node: id, output: {text: [text]}});
        const els = node.withanyoneMetricsElements;
        return {state: node.withanyoneMetrics, text: els.text.value, readOnly: els.text.readOnly,
                meter: els.meter.style.display, label: els.label.textContent, fill: els.fill.style.background};
    }""")
    assert metrics["state"]["lines"] == ["image 1 person 1: Sim(Ref) 0.612, Sim(GT) 0.401, CP +0.300",
                                         "image 1 person 2: Sim(Ref) 0.5, Sim(GT) 0.6, CP -0.100"]
    assert metrics["state"]["meanCP"] == pytest.approx(0.1)
    assert metrics["text"] == "\n".join(metrics["state"]["lines"]) and metrics["readOnly"]
    assert metrics["meter"] == "block" and "+0.100" in metrics["label"] and metrics["fill"]
    page.screenshot(path=str(tmp_path / "metrics.png"))

    # a loaded workflow sets widget values without callbacks: its layout is previewed all the same
    page.evaluate("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'boxes').value = "
                  f"{json.dumps(GOOD_TEXT)}", node_id)
    page.evaluate("() => app.loadGraphData(app.graph.serialize())")
    layout = _wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    assert layout["error"] is None
    assert not page_errors, page_errors
    assert not [m for m in ours if "error" in m.lower()], ours
    page.close()


COUNT_GRAPH = """() => {
    const make = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
    const layout = make("WithAnyoneLayout", 40, 40);
    const encode = make("WithAnyoneIdentityEncode", 40, 520);
    const apply = make("WithAnyoneApply", 520, 40);
    for (const [k, x] of [[1, 400], [2, 760]]) {
        make("WithAnyoneFaceExtract", x, 620).connect(0, encode, encode.findInputSlot(`person_${k}`));
    }
    encode.connect(0, apply, apply.findInputSlot("identities"));
    layout.connect(0, apply, apply.findInputSlot("layout"));
    return layout.id;
}"""
WARNING_OF = "(id) => { app.canvas.draw(true, true); return app.graph.getNodeById(id).withanyoneCountWarning; }"


def test_box_count_checked_against_connected_people_before_the_run(server, browser, tmp_path):
    url, _ = server
    page, page_errors = _open_app(browser, url)
    node_id = page.evaluate(COUNT_GRAPH)
    page.evaluate(SET_WIDGET, [node_id, "people", 3])
    _wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 3)
    warning = page.evaluate(WARNING_OF, node_id)
    assert warning and warning.startswith("3 face boxes but 2 people are connected"), warning
    page.screenshot(path=str(tmp_path / "count_warning.png"))
    page.evaluate(SET_WIDGET, [node_id, "people", 2])
    _wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 2)
    assert page.evaluate(WARNING_OF, node_id) is None
    assert not page_errors, page_errors
    page.close()


def test_shipped_workflows_load_in_the_frontend_as_our_converter_reads_them(server, browser):
    """Each workflows/*.json loads in the real frontend, and the prompt the frontend builds from it is
    the one tools/workflows.py's ui_to_api (used by the server test and the demo) builds."""
    from comfy_env import ROOT
    from workflows import ui_to_api

    url, _ = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    page, page_errors = _open_app(browser, url)
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert len(files) >= 5
    for path in files:
        workflow = json.loads(path.read_text())
        output = page.evaluate("""async (workflow) => {
            await app.loadGraphData(workflow, true, true, "test");
            return (await app.graphToPrompt()).output;
        }""", workflow)
        frontend = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in output.items()}
        assert frontend == ui_to_api(workflow, info), path.name
    assert not page_errors, page_errors
    page.close()
