"""The /withanyone/layout route the editor asks, in a real ComfyUI server: its answers match the node's
own parser and presets, and every bad request gets a 400 with the node's message."""

from __future__ import annotations

import pytest

from .pages import BAD_TEXT, FIVE_TEXT, GOOD_TEXT, error_of, non_finite_message, post

pytestmark = pytest.mark.slow


def test_layout_route(pinned_server, layout_module):
    url = pinned_server
    status, answer = post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": GOOD_TEXT})
    assert status == 200
    assert answer["boxes"] == [list(b) for b in layout_module.parse_boxes(GOOD_TEXT, 1024, 768)]
    assert (answer["width"], answer["height"]) == (1024, 768)
    assert answer["colors"][:4] == ["#{:02x}{:02x}{:02x}".format(*c) for c in layout_module.COLORS]
    # the /api prefix the frontend's api.fetchApi uses reaches the same route
    status, answer = post(url + "/api", {"width": 512, "height": 1024, "source": "preset", "people": 3, "boxes": ""})
    assert status == 200 and answer["boxes"] == [list(b) for b in layout_module.preset_boxes(3, 512, 1024)]
    status, answer = post(url, {"width": 1024, "height": 1024, "source": "image", "people": 2, "boxes": ""})
    assert status == 200 and answer["boxes"] == [] and "layout image" in answer["note"]
    status, answer = post(url, {"width": 1024, "height": 1024, "source": "mask", "people": 2, "boxes": ""})
    assert status == 200 and answer["boxes"] == [] and "layout mask" in answer["note"]
    status, answer = post(url, {"width": 1024, "height": 1024, "source": "lasso", "people": 2, "boxes": ""})
    assert status == 400 and "unknown layout source 'lasso'" in answer["error"]
    # box 5 and later get colours of their own, not box 1's again
    status, answer = post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": FIVE_TEXT})
    assert status == 200 and len(answer["boxes"]) == 5
    assert len(answer["colors"]) == 5 and len(set(answer["colors"])) == 5

    status, answer = post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": BAD_TEXT})
    assert status == 400 and answer["error"] == error_of(layout_module.parse_boxes, BAD_TEXT, 1024, 768)
    status, answer = post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": "\n# none"})
    assert status == 400 and answer["error"].startswith("no boxes given")
    status, answer = post(url, {"width": 1024, "height": 768, "source": "preset", "people": 7, "boxes": ""})
    assert status == 400 and "people must be 1 to 4" in answer["error"]
    status, answer = post(url, {"width": "wide", "height": 768, "source": "preset", "people": 1, "boxes": ""})
    assert status == 400 and "width must be an integer" in answer["error"]
    status, answer = post(url, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    # NaN/inf are not JSON: the route says which box is wrong instead of answering invalid JSON
    for text in ("nan,nan,nan,nan", "0.1,0.1,0.3,0.3\n0,0,inf,100"):
        status, answer = post(url, {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": text})
        assert status == 400 and non_finite_message(layout_module, text, 1024, 768) in answer["error"], answer
    status, answer = post(url, b'{"width": NaN, "height": 768, "source": "preset", "people": 1}')
    assert status == 400 and "width must be an integer" in answer["error"]
