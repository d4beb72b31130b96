"""The layout editor (web/withanyone.js) in a real ComfyUI server and a real browser (Chromium), driven in both
node renderers of each frontend, chosen by the frontend's own setting ``Comfy.VueNodes.Enabled`` (classic
LiteGraph canvas, and the Vue "Nodes 2.0" renderer): the boxes' pixels on screen, a mouse drag that rewrites
the ``boxes`` widget, and the server-side parse of it; the box count against the connected people; the
layout photo and the last generated image behind the boxes.

WITHANYONE_UPDATE_SCREENSHOTS=1 also writes docs/layout-editor-{classic,vue}.png (newest frontend)."""

from __future__ import annotations

import os
import shutil

import pytest

from .pages import (
    ADD_LAYOUT_NODE,
    BAD_TEXT,
    BOXES_TEXTAREA,
    FIVE_TEXT,
    FOUR_TEXT,
    GEOMETRY,
    GOOD_TEXT,
    LATEST_FRONTEND,
    NODE_CLIP,
    PHOTO_COLORS,
    RENDERERS,
    SCREENSHOTS,
    SET_WIDGET,
    WIDGET_VALUE,
    assert_boxes_drawn,
    box_lines,
    drag,
    error_of,
    non_finite_message,
    open_app,
    screen_rgb,
    type_boxes,
    wait_for,
    wait_layout,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("renderer", RENDERERS)
def test_layout_editor(server, browser, layout_module, renderer, tmp_path):
    url, version = server
    page, page_errors = open_app(browser, url, renderer)
    node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 120])
    size = page.evaluate(
        "(id) => [0, 1].map((i) => app.graph.getNodeById(id).widgets.find("
        "(w) => w.name === ['width', 'height'][i]).value)",
        node_id,
    )
    width, height = size
    # the default widgets (a preset) are drawn before anything is touched
    people = page.evaluate(WIDGET_VALUE, [node_id, "people"])
    wait_layout(
        page, node_id, lambda lay: lay["boxes"] == [list(b) for b in layout_module.preset_boxes(people, width, height)]
    )
    wait_for(
        page,
        "(id) => app.graph.getNodeById(id).withanyoneEditor.canvas.clientHeight",
        node_id,
        lambda h: h > 100,
        what="the editor canvas height",
    )
    assert_boxes_drawn(page, node_id)

    # typing into the boxes text area redraws the editor; four lines show without a scroll bar
    page.evaluate(SET_WIDGET, [node_id, "source", "text"])
    type_boxes(page, node_id, FOUR_TEXT)
    wait_layout(
        page,
        node_id,
        lambda lay: lay["boxes"] == [list(b) for b in layout_module.parse_boxes(FOUR_TEXT, width, height)],
    )
    area = page.evaluate(BOXES_TEXTAREA, node_id)
    assert area["value"] == FOUR_TEXT and area["scrollHeight"] <= area["clientHeight"] + 1, area
    type_boxes(page, node_id, FIVE_TEXT)
    expected = [list(b) for b in layout_module.parse_boxes(FIVE_TEXT, width, height)]
    layout = wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    assert layout["error"] is None and len(set(layout["colors"][:5])) == 5
    geometry = assert_boxes_drawn(page, node_id)
    # the message line sits below the drawing, never over it
    assert geometry["message"][1] >= geometry["canvas"][3] - 1

    # drag box 3 (pixels) to the right and down: its line, and only its line, changes
    x1, y1, x2, y2 = geometry["boxes"][2]
    node_pos = geometry["nodePos"]
    shift = (64, 48)  # output pixels; on screen that is shift * screenPerPixel
    drag(page, ((x1 + x2) / 2, (y1 + y2) / 2), [v * geometry["screenPerPixel"] for v in shift])
    text = wait_for(page, WIDGET_VALUE, [node_id, "boxes"], lambda v: v != FIVE_TEXT, what="the boxes widget")
    lines, before = box_lines(text), box_lines(FIVE_TEXT)
    assert text.startswith("# five people\n") and len(lines) == 5
    assert [lines[k] for k in (0, 1, 3, 4)] == [before[k] for k in (0, 1, 3, 4)]
    moved = [float(v) for v in lines[2].split(",")]
    old = layout_module.parse_boxes(FIVE_TEXT, width, height)[2]
    assert moved == pytest.approx([old[0] + shift[0], old[1] + shift[1], old[2] + shift[0], old[3] + shift[1]], abs=3)
    assert page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node_id) == node_pos  # the node stayed
    # the server parses what the editor wrote, and the editor shows the server's answer
    expected = [list(b) for b in layout_module.parse_boxes(text, width, height)]
    wait_layout(page, node_id, lambda lay: lay["boxes"] == expected)
    assert_boxes_drawn(page, node_id)
    wait_for(page, BOXES_TEXTAREA, node_id, lambda a: a["value"] == text, what="the text area on screen")
    prompt = page.evaluate("() => app.graphToPrompt().then((p) => p.output)")
    assert prompt[str(node_id)]["inputs"]["boxes"] == text and prompt[str(node_id)]["inputs"]["source"] == "text"

    # the 16-px token grid on demand: lighter lines every 16 output pixels where no box is
    container = f"[data-node-id='{node_id}'] " if renderer == "vue" else ""
    page.locator(f"{container}.withanyone-layout-editor label", has_text="grid").first.click()
    assert page.evaluate("(id) => app.graph.getNodeById(id).withanyoneEditor.gridToggle.checked", node_id)
    geometry = page.evaluate(GEOMETRY, node_id)
    image = screen_rgb(page)
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
    drag(page, (bx2, by2), (24, 40))
    resized = wait_for(
        page, WIDGET_VALUE, [node_id, "boxes"], lambda v: box_lines(v)[1] != box_lines(text)[1], what="the resized box"
    )
    line = box_lines(resized)[1]
    assert all(0 <= float(v) <= 1 for v in line.split(",")), line
    before, after = (layout_module.parse_boxes(t, width, height)[1] for t in (text, resized))
    assert after[:2] == pytest.approx(before[:2], abs=1)
    assert after[2] > before[2] + 10 and after[3] > before[3] + 10
    assert after[2] % 16 == pytest.approx(0, abs=0.1) or after[2] % 16 == pytest.approx(16, abs=0.1), after
    assert [box_lines(resized)[k] for k in (0, 2, 3, 4)] == [box_lines(text)[k] for k in (0, 2, 3, 4)]

    # add a box with the toolbar, then delete it again (it is selected after adding)
    page.locator(f"{container}.withanyone-layout-editor button", has_text="+ face").first.click()
    wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 6)
    page.locator(f"{container}.withanyone-layout-editor button", has_text="− face").first.click()
    layout = wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 5)
    assert box_lines(page.evaluate(WIDGET_VALUE, [node_id, "boxes"])) == box_lines(resized)

    # a bad line and a NaN box: the node's error, in red below the drawing; the node keeps drawing
    for bad, message in (
        (BAD_TEXT, error_of(layout_module.parse_boxes, BAD_TEXT, width, height)),
        ("nan,nan,nan,nan", non_finite_message(layout_module, "nan,nan,nan,nan", width, height)),
    ):
        page.evaluate(SET_WIDGET, [node_id, "boxes", bad])
        layout = wait_layout(page, node_id, lambda lay, m=message: m in (lay.get("error") or ""))
        assert layout["boxes"] == []
        geometry = wait_for(
            page, GEOMETRY, node_id, lambda g, m=message: m in g["messageText"], what="the error message"
        )
        assert geometry["messageColor"] == "rgb(255, 85, 85)"
    page.evaluate(SET_WIDGET, [node_id, "boxes", GOOD_TEXT])
    wait_layout(
        page,
        node_id,
        lambda lay: lay["boxes"] == [list(b) for b in layout_module.parse_boxes(GOOD_TEXT, width, height)],
    )
    assert_boxes_drawn(page, node_id)

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
    page, page_errors = open_app(browser, url, "vue" if version == LATEST_FRONTEND else "classic")
    layout_id, encode_id = page.evaluate(COUNT_GRAPH)
    page.evaluate(SET_WIDGET, [layout_id, "source", "preset"])
    page.evaluate(SET_WIDGET, [layout_id, "people", 3])
    wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 3)
    warning = wait_for(page, WARNING_OF, layout_id, bool, what="the count warning")
    assert warning.startswith("3 face boxes but 2 people are connected"), warning
    geometry = page.evaluate(GEOMETRY, layout_id)
    assert geometry["messageText"] == warning and geometry["message"][1] >= geometry["canvas"][3] - 1
    page.screenshot(path=str(tmp_path / "count_warning.png"))
    page.evaluate(SET_WIDGET, [layout_id, "people", 2])
    wait_for(page, WARNING_OF, layout_id, lambda w: w is None, what="no count warning")
    # unplugging person 2 is a change elsewhere in the graph: the layout node hears of it
    page.evaluate(
        "(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('person_2')); }", encode_id
    )
    warning = wait_for(page, WARNING_OF, layout_id, bool, what="the warning after unplugging")
    assert warning.startswith("2 face boxes but 1 person is connected"), warning

    # an answer that is not a layout (a proxy's HTML page, a NaN) becomes a message, not a broken node
    message_of = "(id) => app.graph.getNodeById(id).withanyoneEditor.message.textContent"
    for status, body, expected in (
        (502, "<html>Bad Gateway</html>", "HTTP 502"),
        (200, '{"boxes": [[NaN, 0, 1, 1]], "width": 768, "height": 768}', "not a layout"),
    ):
        page.route("**/withanyone/layout", _fulfil_with(status, body))
        page.evaluate(SET_WIDGET, [layout_id, "people", 1 if status == 502 else 2])
        wait_for(page, message_of, layout_id, lambda m, e=expected: e in m, what=f"the message for {expected}")
        page.unroute("**/withanyone/layout")
    page.evaluate(SET_WIDGET, [layout_id, "people", 1])
    wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 1 and not lay["error"])
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
BACKGROUND_OF = (
    "(id) => { const e = app.graph.getNodeById(id).withanyoneEditor; return e.background ? e.backgroundUrl : null; }"
)


def test_layout_photo_and_last_generated_image_behind_the_boxes(server, browser):
    """The connected layout photo is drawn behind the boxes; without one, the last image generated
    downstream of the layout; the photo toggle hides it."""
    url, version = server
    page, page_errors = open_app(browser, url, "vue" if version == LATEST_FRONTEND else "classic")
    photo, generated = PHOTO_COLORS
    layout_id, load_id, preview_id = page.evaluate(PHOTO_GRAPH, photo)
    page.evaluate(SET_WIDGET, [layout_id, "source", "text"])  # the image source has no boxes before the run
    page.evaluate(SET_WIDGET, [layout_id, "boxes", "0.05,0.05,0.2,0.2"])
    wait_layout(page, layout_id, lambda lay: len(lay["boxes"]) == 1)

    def frame_colour():
        geometry = page.evaluate(GEOMETRY, layout_id)
        fx1, fy1, fx2, fy2 = geometry["frame"]
        return screen_rgb(page).getpixel((round((fx1 + fx2) / 2), round((fy1 + fy2) / 2 + 10)))

    def drawn_like(colour, photo_colour):  # the photo at 75 % over the dark frame
        return all(abs(c - (0.75 * p + 0.25 * f)) < 20 for c, p, f in zip(colour, photo_colour, (40, 40, 48)))

    assert photo in wait_for(page, BACKGROUND_OF, layout_id, bool, what="the layout photo")
    assert drawn_like(frame_colour(), PHOTO_COLORS[photo]), frame_colour()

    # the run's image (PreviewImage downstream of the layout) replaces it once the photo is unplugged
    page.evaluate(
        """([preview, name]) => window.comfyAPI.api.api.dispatchCustomEvent("executed",
        {node: String(preview), display_node: String(preview), output: {images: [{filename: name, subfolder: "",
         type: "input"}]}})""",
        [preview_id, generated],
    )
    page.evaluate(
        "(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.findInputSlot('layout_image')); }",
        layout_id,
    )
    assert generated in wait_for(page, BACKGROUND_OF, layout_id, lambda u: u and generated in u, what="the run's image")
    assert drawn_like(frame_colour(), PHOTO_COLORS[generated]), frame_colour()

    page.evaluate("(id) => app.graph.getNodeById(id).withanyoneEditor.photoToggle.click()", layout_id)
    assert drawn_like(frame_colour(), (40, 40, 48)), frame_colour()
    assert not page_errors, page_errors
    page.close()
