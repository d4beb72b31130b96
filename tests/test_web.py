"""The frontend extension (web/withanyone.js) in a real ComfyUI server and a real browser (Chromium).

One server boot per frontend: the frontend ComfyUI 0.3.75 pins (comfyui-frontend-package in
requirements-dev.txt) and the newest one on PyPI (LATEST_FRONTEND, installed on demand into
.cache/frontend-<version>/ and served with ComfyUI's own --front-end-root). The layout editor is
driven in both node renderers of each frontend, chosen by the frontend's own setting
``Comfy.VueNodes.Enabled`` (classic LiteGraph canvas, and the Vue "Nodes 2.0" renderer): the boxes'
pixels on screen, a mouse drag that rewrites the ``boxes`` widget, and the server-side parse of it.

WITHANYONE_UPDATE_SCREENSHOTS=1 also writes docs/layout-editor-{classic,vue}.png (newest frontend).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_env import PACK_NAME, ROOT, import_comfyui, import_pack
from comfy_server import ComfyServer  # tools/, put on sys.path by comfy_env

pytestmark = pytest.mark.slow

PINNED_FRONTEND = importlib.metadata.version("comfyui-frontend-package")
# the newest comfyui-frontend-package on PyPI when the editor was written (the Vue renderer's current form)
LATEST_FRONTEND = os.environ.get("WITHANYONE_LATEST_FRONTEND", "1.58.1")
FRONTENDS = [PINNED_FRONTEND, LATEST_FRONTEND]
RENDERERS = ["classic", "vue"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
GOOD_TEXT = "# two people\n0.1,0.2,0.4,0.6\n600 100 900 500"
BAD_TEXT = "0.1,0.2,0.4,0.6\n10,10,5"
# five boxes (box 5 has a colour of its own), a comment that the editor must keep, pixels and fractions
FIVE_TEXT = "# five people\n64,128,224,288\n0.3,0.15,0.45,0.35\n480,160,608,288\n600,120,740,260\n96,448,256,608"
FOUR_TEXT = "# four lines\n0.1,0.2,0.3,0.5\n0.4,0.2,0.6,0.5\n0.7,0.2,0.9,0.5"
SCREENSHOTS = ROOT / "docs"


def _frontend_root(version: str) -> Path | None:
    """The static folder of comfyui-frontend-package ``version`` (None: the one installed in the venv)."""
    if version == PINNED_FRONTEND:
        return None
    target = ROOT / ".cache" / f"frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        shutil.rmtree(target, ignore_errors=True)
        # a folder of its own: the venv keeps the frontend ComfyUI 0.3.75 pins
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                               f"comfyui-frontend-package=={version}"], capture_output=True, text=True)
        if done.returncode or not (static / "index.html").is_file():
            message = f"comfyui-frontend-package=={version} could not be installed: {done.stderr[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return static


@pytest.fixture(scope="module")
def layout_module():
    """withanyone_core.layout as the server's route and the node import it: the single source of the boxes."""
    import_comfyui()
    import_pack()
    return importlib.import_module("withanyone_core.layout")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Boots one ComfyUI server per frontend version on first use; all stop at the end of the module."""
    booted = {}
    with contextlib.ExitStack() as stack:
        def get(version: str) -> tuple[str, str]:
            if version not in booted:
                root = _frontend_root(version)
                base = tmp_path_factory.mktemp(f"comfy_web_{version}")
                # a returning user: no template browser over the canvas on the first page load
                settings = base / "user" / "default" / "comfy.settings.json"
                settings.parent.mkdir(parents=True)
                settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
                _write_photos(base / "input")
                extra = ("--front-end-root", str(root)) if root else ()
                comfy = stack.enter_context(ComfyServer(base, extra_args=extra))
                registered = json.load(urllib.request.urlopen(comfy.url + "/object_info/WithAnyoneLayout", timeout=60))
                assert registered, "the pack's nodes did not load:\n" + comfy.log_tail()
                booted[version] = (comfy.url, version)
            return booted[version]

        yield get


@pytest.fixture(params=FRONTENDS, ids=lambda v: f"frontend-{v}")
def server(request, servers):
    """(url, frontend version), for the tests that run on every frontend."""
    return servers(request.param)


@pytest.fixture
def latest_server(servers):
    """The server with the newest frontend."""
    return servers(LATEST_FRONTEND)[0]


@pytest.fixture
def pinned_server(servers):
    """The server with the frontend ComfyUI 0.3.75 pins, for what does not depend on the frontend."""
    return servers(PINNED_FRONTEND)[0]


PHOTO_COLORS = {"withanyone_test_layout_photo.png": (0, 190, 200), "withanyone_test_generated.png": (220, 120, 0)}


def _write_photos(folder: Path) -> None:
    """Two flat-colour "photos" in the server's input/ folder: the layout photo and a generated image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, color in PHOTO_COLORS.items():
        Image.new("RGB", (768, 768), color).save(folder / name)


def _post(url: str, body, path: str = "/withanyone/layout") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _error_of(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def _non_finite_message(layout_module, text, width, height) -> str:
    """What a NaN/inf box must answer: the node's own parser's error where it refuses them, else the route's."""
    try:
        layout_module.parse_boxes(text, width, height)
    except ValueError as err:
        return str(err)
    return "not a finite number"


def test_server_log_has_no_missing_modules(pinned_server):
    """make setup installs ComfyUI's own optional requirements (requirements-dev.txt), so the test server's
    log opens without import tracebacks; torchaudio alone is left out (no release matches torch 2.14.1)."""
    log = json.load(urllib.request.urlopen(pinned_server + "/internal/logs/raw", timeout=30))
    text = "\n".join(entry["m"] for entry in log["entries"])
    missing = set(re.findall(r"No module named '([\w.]+)'", text))
    # PyOpenGL (ComfyUI 0.30's requirement, via comfy-angle) notes at INFO that its optional C speed-up, in no
    # ComfyUI requirements file, is absent: "No OpenGL_accelerate module loaded: No module named ..."
    optional = set(re.findall(r"No (\w+) module loaded: No module named '\1'", text))
    assert missing - optional <= {"torchaudio"}, f"ComfyUI's log names missing modules: {sorted(missing - optional)}"


def _our_nodes(url: str) -> dict:
    """This pack's nodes as the running server lists them in /object_info."""
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    assert ours, "no node of this pack in /object_info"
    return ours


def test_every_node_has_a_help_page(pinned_server):
    """web/docs/<node id>.md is what the frontend's node help panel shows (served under /extensions/)."""
    url = pinned_server
    missing = []
    for node_id, info in _our_nodes(url).items():
        try:
            page = urllib.request.urlopen(f"{url}/extensions/{PACK_NAME}/docs/{node_id}.md", timeout=30).read().decode()
        except urllib.error.HTTPError:
            missing.append(node_id)
            continue
        assert page.splitlines()[0] == f"# {info['display_name']}", f"web/docs/{node_id}.md: title != display name"
        assert len(page) > 300, f"web/docs/{node_id}.md says too little"
        # the Chinese page the frontend picks for the zh locale
        try:
            zh = urllib.request.urlopen(f"{url}/extensions/{PACK_NAME}/docs/{node_id}/zh.md", timeout=30).read().decode()
        except urllib.error.HTTPError:
            missing.append(f"{node_id}/zh")
            continue
        assert zh.startswith("# ") and CJK.search(zh.splitlines()[0]), f"web/docs/{node_id}/zh.md: no Chinese title"
    assert not missing, f"add help pages web/docs/<node id>.md and web/docs/<node id>/zh.md for: {missing}"


CJK = re.compile(r"[\u4e00-\u9fff]")


def test_locales_cover_every_node_input_and_output(pinned_server):
    """locales/{en,zh}/nodeDefs.json against the live /object_info: every node's name and description, every
    input and output (name, and tooltip where the schema has one). English is the schema's own text; Chinese
    is a translation (tooltips and descriptions hold Chinese characters). Fix: run tools/build_locales.py."""
    from build_locales import english_node_defs

    url = pinned_server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    expected = english_node_defs(info, f"custom_nodes.{PACK_NAME}")
    assert expected
    locales = {lang: json.loads((ROOT / "locales" / lang / "nodeDefs.json").read_text()) for lang in ("en", "zh")}
    problems = []
    for node_id, entry in expected.items():
        if locales["en"].get(node_id) != entry:
            problems.append(f"en: {node_id} differs from the node's schema")
        zh = locales["zh"].get(node_id)
        if not zh:
            problems.append(f"zh: no entry for {node_id}")
            continue
        for field in ("display_name", "description"):
            if field in entry and not zh.get(field):
                problems.append(f"zh: {node_id}.{field} missing")
        if "description" in entry and not CJK.search(zh.get("description", "")):
            problems.append(f"zh: {node_id}.description is not translated")
        for part in ("inputs", "outputs"):
            for key, slot in entry[part].items():
                got = zh.get(part, {}).get(key, {})
                if not got.get("name"):
                    problems.append(f"zh: {node_id}.{part}.{key}.name missing")
                if "tooltip" in slot and not CJK.search(got.get("tooltip", "")):
                    problems.append(f"zh: {node_id}.{part}.{key}.tooltip missing or untranslated")
    assert not problems, "run tools/build_locales.py (it lists what to translate):\n" + "\n".join(problems)
    # ComfyUI serves them to the frontend
    served = json.load(urllib.request.urlopen(url + "/i18n", timeout=30))
    assert served["zh"]["nodeDefs"]["WithAnyoneLayout"] == locales["zh"]["WithAnyoneLayout"]
    assert served["en"]["nodeDefs"]["WithAnyoneLayout"] == locales["en"]["WithAnyoneLayout"]


def test_chinese_locale_in_the_frontend(latest_server, browser):
    """With the frontend's language set to Chinese, the node shows the zh locale's names. Checked on the newest
    frontend: with 1.32.9 our node titles stay English although /i18n serves the same files (its core nodes,
    translated from its own bundle, do change)."""
    url = latest_server
    zh = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text())["WithAnyoneLayout"]

    def set_locale(value):
        req = urllib.request.Request(url + "/settings/Comfy.Locale", data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30)

    set_locale("zh")
    try:
        page, page_errors = _open_app(browser, url)
        node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 120])
        shown = page.evaluate("""(id) => {
            const node = app.graph.getNodeById(id);
            const width = node.widgets.find((w) => w.name === "width");
            return {title: node.title, width: width.label ?? null};
        }""", node_id)
        assert shown["title"] == zh["display_name"], shown
        assert shown["width"] == zh["inputs"]["width"]["name"], shown
        assert not page_errors, page_errors
        page.close()
    finally:
        set_locale("en")


def test_every_input_and_output_has_a_tooltip(pinned_server):
    """TOOLTIPS: fails only when a node schema lacks a tooltip (the node authors' part, nodes/*.py); the
    message lists every input and output without one."""
    url = pinned_server
    missing = []
    for node_id, info in _our_nodes(url).items():
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip")):
                    missing.append(f"{node_id} input {name}")
        tooltips = info.get("output_tooltips") or []
        for index, name in enumerate(info.get("output_name") or []):
            if index >= len(tooltips) or not tooltips[index]:
                missing.append(f"{node_id} output {index} ({name})")
    assert not missing, f"{len(missing)} inputs/outputs without a tooltip:\n" + "\n".join(missing)


def test_layout_route(pinned_server, layout_module):
    url = pinned_server
    status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": GOOD_TEXT})
    assert status == 200
    assert answer["boxes"] == [list(b) for b in layout_module.parse_boxes(GOOD_TEXT, 1024, 768)]
    assert (answer["width"], answer["height"]) == (1024, 768)
    assert answer["colors"][:4] == ["#%02x%02x%02x" % c for c in layout_module.COLORS]
    # the /api prefix the frontend's api.fetchApi uses reaches the same route
    status, answer = _post(url + "/api", {"width": 512, "height": 1024, "source": "preset", "people": 3, "boxes": ""})
    assert status == 200 and answer["boxes"] == [list(b) for b in layout_module.preset_boxes(3, 512, 1024)]
    status, answer = _post(url, {"width": 1024, "height": 1024, "source": "image", "people": 2, "boxes": ""})
    assert status == 200 and answer["boxes"] == [] and "layout image" in answer["note"]
    status, answer = _post(url, {"width": 1024, "height": 1024, "source": "mask", "people": 2, "boxes": ""})
    assert status == 200 and answer["boxes"] == [] and "layout mask" in answer["note"]
    status, answer = _post(url, {"width": 1024, "height": 1024, "source": "lasso", "people": 2, "boxes": ""})
    assert status == 400 and "unknown layout source 'lasso'" in answer["error"]
    # box 5 and later get colours of their own, not box 1's again
    status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": FIVE_TEXT})
    assert status == 200 and len(answer["boxes"]) == 5
    assert len(answer["colors"]) == 5 and len(set(answer["colors"])) == 5

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
    # NaN/inf are not JSON: the route says which box is wrong instead of answering invalid JSON
    for text in ("nan,nan,nan,nan", "0.1,0.1,0.3,0.3\n0,0,inf,100"):
        status, answer = _post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": text})
        assert status == 400 and _non_finite_message(layout_module, text, 1024, 768) in answer["error"], answer
    status, answer = _post(url, b'{"width": NaN, "height": 768, "source": "preset", "people": 1}')
    assert status == 400 and "width must be an integer" in answer["error"]


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


def _wait(page, script, arg, predicate, timeout=15, what="value"):
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = page.evaluate(script, arg)
        if predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} never matched: {value}")


def _wait_layout(page, node_id, predicate, timeout=15):
    """Poll node.withanyoneLayout until ``predicate(layout)`` holds; returns it."""
    return json.loads(_wait(page, LAYOUT_OF, node_id, lambda v: v != "null" and predicate(json.loads(v)),
                            timeout, "node.withanyoneLayout"))


def _open_app(browser, url, renderer="classic"):
    """The ComfyUI page in the chosen node renderer, our extension registered, an empty graph."""
    # the frontend's own setting, stored by the server before the page reads its settings
    req = urllib.request.Request(url + "/settings/Comfy.VueNodes.Enabled", data=json.dumps(renderer == "vue").encode(),
                                 headers={"Content-Type": "application/json"})
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


def _hex(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def _best_match(image, x: float, y: float, color, radius: int = 3) -> float:
    """The smallest colour distance to ``color`` around screen point (x, y)."""
    best = 1e9
    for dx in range(-radius, radius + 1):
        for dy in range(-radius, radius + 1):
            px = image.getpixel((int(round(x)) + dx, int(round(y)) + dy))[:3]
            best = min(best, sum((a - b) ** 2 for a, b in zip(px, color)) ** 0.5)
    return best


def _screen(page):
    from PIL import Image

    return Image.open(io.BytesIO(page.screenshot())).convert("RGB")


def _assert_boxes_drawn(page, node_id):
    geometry = page.evaluate(GEOMETRY, node_id)
    image = _screen(page)
    colors = [_hex(c) for c in geometry["colors"]]
    for k, (x1, y1, x2, y2) in enumerate(geometry["boxes"]):
        # the middle of each edge carries the box's own colour
        for x, y in (((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)):
            assert _best_match(image, x, y, colors[k]) < 45, f"box {k + 1} is not drawn at {x:.0f},{y:.0f}"
    # away from every box the image area shows no box colour
    fx1, fy1, fx2, fy2 = geometry["frame"]
    x, y = fx1 + 6, fy2 - 6
    if not any(b[0] - 4 <= x <= b[2] + 4 and b[1] - 4 <= y <= b[3] + 4 for b in geometry["boxes"]):
        assert all(_best_match(image, x, y, c, radius=1) > 60 for c in colors), "a box colour outside the boxes"
    return geometry


def _type_boxes(page, node_id, text):
    """Type into the boxes text area on screen (the renderer's own element), as a user does."""
    page.evaluate_handle(BOXES_ELEMENT, node_id).as_element().fill(text)


def _drag(page, start, delta, steps=6):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + delta[0] / 2, start[1] + delta[1] / 2, steps=steps)
    page.mouse.move(start[0] + delta[0], start[1] + delta[1], steps=steps)
    page.mouse.up()


def _box_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_layout_editor(server, browser, layout_module, renderer, tmp_path):
    url, version = server
    page, page_errors = _open_app(browser, url, renderer)
    node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 120])
    size = page.evaluate("(id) => [0, 1].map((i) => app.graph.getNodeById(id).widgets.find("
                         "(w) => w.name === ['width', 'height'][i]).value)", node_id)
    width, height = size
    # the default widgets (a preset) are drawn before anything is touched
    people = page.evaluate(WIDGET_VALUE, [node_id, "people"])
    _wait_layout(page, node_id, lambda lay: lay["boxes"] == [list(b) for b in
                                                               layout_module.preset_boxes(people, width, height)])
    _wait(page, "(id) => app.graph.getNodeById(id).withanyoneEditor.canvas.clientHeight", node_id, lambda h: h > 100,
          what="the editor canvas height")
    _assert_boxes_drawn(page, node_id)

    # typing into the boxes text area redraws the editor; four lines show without a scroll bar
    page.evaluate(SET_WIDGET, [node_id, "source", "text"])
    _type_boxes(page, node_id, FOUR_TEXT)
    _wait_layout(page, node_id, lambda lay: lay["boxes"] == [list(b) for b in
                                                               layout_module.parse_boxes(FOUR_TEXT, width, height)])
    area = page.evaluate(BOXES_TEXTAREA, node_id)
    assert area["value"] == FOUR_TEXT and area["scrollHeight"] <= area["clientHeight"] + 1, area
    _type_boxes(page, node_id, FIVE_TEXT)
    expected = [list(b) for b in layout_module.parse_boxes(FIVE_TEXT, width, height)]
    layout = _wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    assert layout["error"] is None and len(set(layout["colors"][:5])) == 5
    geometry = _assert_boxes_drawn(page, node_id)
    # the message line sits below the drawing, never over it
    assert geometry["message"][1] >= geometry["canvas"][3] - 1

    # drag box 3 (pixels) to the right and down: its line, and only its line, changes
    x1, y1, x2, y2 = geometry["boxes"][2]
    node_pos = geometry["nodePos"]
    shift = (64, 48)  # output pixels; on screen that is shift * screenPerPixel
    _drag(page, ((x1 + x2) / 2, (y1 + y2) / 2), [v * geometry["screenPerPixel"] for v in shift])
    text = _wait(page, WIDGET_VALUE, [node_id, "boxes"], lambda v: v != FIVE_TEXT, what="the boxes widget")
    lines, before = _box_lines(text), _box_lines(FIVE_TEXT)
    assert text.startswith("# five people\n") and len(lines) == 5
    assert [lines[k] for k in (0, 1, 3, 4)] == [before[k] for k in (0, 1, 3, 4)]
    moved = [float(v) for v in lines[2].split(",")]
    old = layout_module.parse_boxes(FIVE_TEXT, width, height)[2]
    assert moved == pytest.approx([old[0] + shift[0], old[1] + shift[1], old[2] + shift[0], old[3] + shift[1]], abs=3)
    assert page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node_id) == node_pos  # the node stayed
    # the server parses what the editor wrote, and the editor shows the server's answer
    expected = [list(b) for b in layout_module.parse_boxes(text, width, height)]
    _wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    _assert_boxes_drawn(page, node_id)
    _wait(page, BOXES_TEXTAREA, node_id, lambda a: a["value"] == text, what="the text area on screen")
    prompt = page.evaluate("() => app.graphToPrompt().then((p) => p.output)")
    assert prompt[str(node_id)]["inputs"]["boxes"] == text and prompt[str(node_id)]["inputs"]["source"] == "text"

    # the 16-px token grid on demand: lighter lines every 16 output pixels where no box is
    container = f"[data-node-id='{node_id}'] " if renderer == "vue" else ""
    page.locator(f"{container}.withanyone-layout-editor label", has_text="grid").first.click()
    assert page.evaluate("(id) => app.graph.getNodeById(id).withanyoneEditor.gridToggle.checked", node_id)
    geometry = page.evaluate(GEOMETRY, node_id)
    image = _screen(page)
    fx1, fy1, fx2, fy2 = geometry["frame"]
    step = 16 * geometry["screenPerPixel"]
    row = fy2 - 8 * geometry["screenPerPixel"]  # the last token row: below every box of FIVE_TEXT
    def brightness(x, spread):  # the brightest pixel within `spread` (a 1-px line falls on one of them)
        return max(sum(image.getpixel((round(x) + d, round(row)))) for d in range(-spread, spread + 1))

    on_line = [brightness(fx1 + k * step, 1) for k in range(4, 12)]
    between = [brightness(fx1 + (k + 0.5) * step, 0) for k in range(4, 12)]
    assert min(on_line) > max(between) + 12, (on_line, between)
    if version == LATEST_FRONTEND:
        page.screenshot(path=str(tmp_path / f"layout-editor-{renderer}.png"), clip=page.evaluate(NODE_CLIP, node_id))

    # drag the bottom-right corner of box 2, written as fractions: it grows, its top-left stays, and its
    # line stays in fractions (with the grid on, the corner snaps to the 16-px tokens)
    geometry = page.evaluate(GEOMETRY, node_id)
    bx1, by1, bx2, by2 = geometry["boxes"][1]
    _drag(page, (bx2, by2), (24, 40))
    resized = _wait(page, WIDGET_VALUE, [node_id, "boxes"], lambda v: _box_lines(v)[1] != _box_lines(text)[1],
                    what="the resized box")
    line = _box_lines(resized)[1]
    assert all(0 <= float(v) <= 1 for v in line.split(",")), line
    before, after = (layout_module.parse_boxes(t, width, height)[1] for t in (text, resized))
    assert after[:2] == pytest.approx(before[:2], abs=1)
    assert after[2] > before[2] + 10 and after[3] > before[3] + 10
    assert after[2] % 16 == pytest.approx(0, abs=0.1) or after[2] % 16 == pytest.approx(16, abs=0.1), after
    assert [_box_lines(resized)[k] for k in (0, 2, 3, 4)] == [_box_lines(text)[k] for k in (0, 2, 3, 4)]

    # add a box with the toolbar, then delete it again (it is selected after adding)
    page.locator(f"{container}.withanyone-layout-editor button", has_text="+ face").first.click()
    _wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 6)
    page.locator(f"{container}.withanyone-layout-editor button", has_text="− face").first.click()
    layout = _wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 5)
    assert _box_lines(page.evaluate(WIDGET_VALUE, [node_id, "boxes"])) == _box_lines(resized)

    # a bad line and a NaN box: the node's error, in red below the drawing; the node keeps drawing
    for bad, message in ((BAD_TEXT, _error_of(layout_module.parse_boxes, BAD_TEXT, width, height)),
                         ("nan,nan,nan,nan", _non_finite_message(layout_module, "nan,nan,nan,nan", width, height))):
        page.evaluate(SET_WIDGET, [node_id, "boxes", bad])
        layout = _wait_layout(page, node_id, lambda lay, m=message: m in (lay.get("error") or ""))
        assert layout["boxes"] == []
        geometry = _wait(page, GEOMETRY, node_id, lambda g: message in g["messageText"], what="the error message")
        assert geometry["messageColor"] == "rgb(255, 85, 85)"
    page.evaluate(SET_WIDGET, [node_id, "boxes", GOOD_TEXT])
    _wait_layout(page, node_id, lambda lay: lay["boxes"] == [list(b) for b in
                                                               layout_module.parse_boxes(GOOD_TEXT, width, height)])
    _assert_boxes_drawn(page, node_id)

    # the editor stays out of the prompt and the saved workflow
    prompt = page.evaluate("() => app.graphToPrompt().then((p) => p.output)")
    assert "withanyone_editor" not in prompt[str(node_id)]["inputs"]
    saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", node_id)
    assert GOOD_TEXT in saved and None not in saved
    assert not page_errors, page_errors
    page.close()

    if version == LATEST_FRONTEND and os.environ.get("WITHANYONE_UPDATE_SCREENSHOTS"):
        shutil.copy(tmp_path / f"layout-editor-{renderer}.png", SCREENSHOTS / f"layout-editor-{renderer}.png")


COUNT_GRAPH = """() => {
    const make = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
    const layout = make("WithAnyoneLayout", 40, 40);
    const encode = make("WithAnyoneIdentityEncode", 40, 760);
    const apply = make("WithAnyoneApply", 520, 40);
    for (const [k, x] of [[1, 400], [2, 760]]) {
        make("WithAnyoneFaceExtract", x, 860).connect(0, encode, encode.findInputSlot(`person_${k}`));
    }
    encode.connect(0, apply, apply.findInputSlot("identities"));
    layout.connect(0, apply, apply.findInputSlot("layout"));
    return [layout.id, encode.id];
}"""
WARNING_OF = "(id) => app.graph.getNodeById(id).withanyoneCountWarning ?? null"


def _fulfil_with(status: int, body: str):
    def handler(route):
        route.fulfill(status=status, body=body)
    return handler


def test_box_count_checked_against_connected_people_before_the_run(server, browser, tmp_path):
    """The warning follows the links (through the graph's own link store) and sits below the drawing."""
    url, version = server
    page, page_errors = _open_app(browser, url, "vue" if version == LATEST_FRONTEND else "classic")
    layout_id, encode_id = page.evaluate(COUNT_GRAPH)
    page.evaluate(SET_WIDGET, [layout_id, "source", "preset"])
    page.evaluate(SET_WIDGET, [layout_id, "people", 3])
    _wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 3)
    warning = _wait(page, WARNING_OF, layout_id, bool, what="the count warning")
    assert warning.startswith("3 face boxes but 2 people are connected"), warning
    geometry = page.evaluate(GEOMETRY, layout_id)
    assert geometry["messageText"] == warning and geometry["message"][1] >= geometry["canvas"][3] - 1
    page.screenshot(path=str(tmp_path / "count_warning.png"))
    page.evaluate(SET_WIDGET, [layout_id, "people", 2])
    _wait(page, WARNING_OF, layout_id, lambda w: w is None, what="no count warning")
    # unplugging person 2 is a change elsewhere in the graph: the layout node hears of it
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('person_2')); }",
                  encode_id)
    warning = _wait(page, WARNING_OF, layout_id, bool, what="the warning after unplugging")
    assert warning.startswith("2 face boxes but 1 person is connected"), warning

    # an answer that is not a layout (a proxy's HTML page, a NaN) becomes a message, not a broken node
    message_of = "(id) => app.graph.getNodeById(id).withanyoneEditor.message.textContent"
    for status, body, expected in ((502, "<html>Bad Gateway</html>", "HTTP 502"),
                                   (200, '{"boxes": [[NaN, 0, 1, 1]], "width": 768, "height": 768}', "not a layout")):
        page.route("**/withanyone/layout", _fulfil_with(status, body))
        page.evaluate(SET_WIDGET, [layout_id, "people", 1 if status == 502 else 2])
        _wait(page, message_of, layout_id, lambda m, e=expected: e in m, what=f"the message for {expected}")
        page.unroute("**/withanyone/layout")
    page.evaluate(SET_WIDGET, [layout_id, "people", 1])
    _wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 1 and not lay["error"])
    assert not page_errors, page_errors
    page.close()


PHOTO_GRAPH = """(photo) => {
    const make = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
    const layout = make("WithAnyoneLayout", 420, 40);
    const load = make("LoadImage", 40, 40);
    load.widgets.find((w) => w.name === "image").value = photo;
    load.connect(0, layout, layout.findInputSlot("layout_image"));
    const preview = make("PreviewImage", 900, 40);
    layout.connect(layout.findOutputSlot("preview"), preview, 0);
    return [layout.id, load.id, preview.id];
}"""
BACKGROUND_OF = "(id) => { const e = app.graph.getNodeById(id).withanyoneEditor; return e.background ? e.backgroundUrl : null; }"


def test_layout_photo_and_last_generated_image_behind_the_boxes(server, browser):
    """The connected layout photo is drawn behind the boxes; without one, the last image generated
    downstream of the layout; the photo toggle hides it."""
    url, version = server
    page, page_errors = _open_app(browser, url, "vue" if version == LATEST_FRONTEND else "classic")
    photo, generated = PHOTO_COLORS
    layout_id, load_id, preview_id = page.evaluate(PHOTO_GRAPH, photo)
    page.evaluate(SET_WIDGET, [layout_id, "source", "text"])  # the image source has no boxes before the run
    page.evaluate(SET_WIDGET, [layout_id, "boxes", "0.05,0.05,0.2,0.2"])
    _wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 1)

    def frame_colour():
        geometry = page.evaluate(GEOMETRY, layout_id)
        fx1, fy1, fx2, fy2 = geometry["frame"]
        return _screen(page).getpixel((round((fx1 + fx2) / 2), round((fy1 + fy2) / 2 + 10)))

    def drawn_like(colour, photo_colour):  # the photo at 75 % over the dark frame
        return all(abs(c - (0.75 * p + 0.25 * f)) < 20 for c, p, f in zip(colour, photo_colour, (40, 40, 48)))

    assert photo in _wait(page, BACKGROUND_OF, layout_id, bool, what="the layout photo")
    assert drawn_like(frame_colour(), PHOTO_COLORS[photo]), frame_colour()

    # the run's image (PreviewImage downstream of the layout) replaces it once the photo is unplugged
    page.evaluate("""([preview, name]) => window.comfyAPI.api.api.dispatchCustomEvent("executed",
        {node: String(preview), display_node: String(preview), output: {images: [{filename: name, subfolder: "",
         type: "input"}]}})""", [preview_id, generated])
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('layout_image')); }",
                  layout_id)
    assert generated in _wait(page, BACKGROUND_OF, layout_id, lambda u: u and generated in u, what="the run's image")
    assert drawn_like(frame_colour(), PHOTO_COLORS[generated]), frame_colour()

    page.evaluate("(id) => app.graph.getNodeById(id).withanyoneEditor.photoToggle.click()", layout_id)
    assert drawn_like(frame_colour(), (40, 40, 48)), frame_colour()
    assert not page_errors, page_errors
    page.close()


def test_identity_metrics_and_extension_listing(pinned_server, browser):
    url = pinned_server
    page, page_errors = _open_app(browser, url)
    extensions = page.evaluate("() => fetch('/extensions').then((r) => r.json())")
    assert f"/extensions/{PACK_NAME}/withanyone.js" in extensions
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

    # a loaded workflow sets widget values without callbacks: its layout is drawn all the same
    node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 160])
    page.evaluate(SET_WIDGET, [node_id, "source", "text"])
    page.evaluate("([id, text]) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'boxes').value = text",
                  [node_id, GOOD_TEXT])
    page.evaluate("() => app.loadGraphData(app.graph.serialize())")
    layout = _wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 2)
    assert layout["error"] is None
    assert not page_errors, page_errors
    page.close()


def test_shipped_workflows_load_in_the_frontend_as_our_converter_reads_them(pinned_server, browser):
    """Each shipped workflow loads in the real frontend, and the prompt the frontend builds from it is
    the one tools/workflows.py's ui_to_api (used by the server test and the demo) builds."""
    from workflows import ui_to_api

    url = pinned_server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    page, page_errors = _open_app(browser, url)
    folder = ROOT / "example_workflows" if (ROOT / "example_workflows").is_dir() else ROOT / "workflows"
    files = sorted(folder.glob("*.json"))
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
