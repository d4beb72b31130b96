"""The Identity Metrics node's text box and meter in the frontend, the extension's listing, and a layout
drawn from a loaded workflow."""

from __future__ import annotations

import pytest

from support.comfy_env import PACK_NAME

from .pages import ADD_LAYOUT_NODE, GOOD_TEXT, SET_WIDGET, open_app, wait_layout

pytestmark = pytest.mark.slow


def test_identity_metrics_and_extension_listing(pinned_server, browser):
    url = pinned_server
    page, page_errors = open_app(browser, url)
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
    assert metrics["state"]["lines"] == [
        "image 1 person 1: Sim(Ref) 0.612, Sim(GT) 0.401, CP +0.300",
        "image 1 person 2: Sim(Ref) 0.5, Sim(GT) 0.6, CP -0.100",
    ]
    assert metrics["state"]["meanCP"] == pytest.approx(0.1)
    assert metrics["text"] == "\n".join(metrics["state"]["lines"]) and metrics["readOnly"]
    assert metrics["meter"] == "block" and "+0.100" in metrics["label"] and metrics["fill"]

    # a loaded workflow sets widget values without callbacks: its layout is drawn all the same
    node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 160])
    page.evaluate(SET_WIDGET, [node_id, "source", "text"])
    page.evaluate(
        "([id, text]) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'boxes').value = text",
        [node_id, GOOD_TEXT],
    )
    page.evaluate("() => app.loadGraphData(app.graph.serialize())")
    layout = wait_layout(page, node_id, lambda lay: len(lay["boxes"]) == 2)
    assert layout["error"] is None
    assert not page_errors, page_errors
    page.close()
