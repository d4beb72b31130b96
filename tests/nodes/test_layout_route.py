"""POST /withanyone/layout's request handling (nodes/routes.py), in-process on the real ComfyUI modules: every
body is either answered with valid JSON or refused with a LayoutRequestError (a 4xx), never another exception
(a 500). The HTTP side (body cap, status codes, a server that stays responsive) is in test_comfy_server.py."""

from __future__ import annotations

import json
import random
import time

import pytest

from support.comfy_env import import_comfyui, import_pack


@pytest.fixture(scope="module")
def routes():
    import_comfyui()
    import_pack()
    from withanyone_pack.nodes import routes

    return routes


GOOD = {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": "0.1,0.2,0.4,0.6\n600 100 900 500"}


def _refused(routes, body) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(routes.LayoutRequestError) as info:
        routes.layout_response(raw)
    return str(info.value)


def test_the_bad_requests_that_gave_a_500_are_refused_by_name(routes):
    cases = {
        b"[" * 30000 + b"]" * 30000: "nested too deeply",
        b'{"width": 1'
        + b"0" * 400
        + b', "height": 768, "source": "preset", "people": 1}': "width must be an integer from 256 to 4096, got a number of 401 digits",
        b'{"width": 1e400, "height": 768, "source": "preset", "people": 1}': "width must be an integer",
        json.dumps(
            {**GOOD, "source": ["text"]}
        ).encode(): "source must be one of preset, text, image, mask, got ['text']",
        json.dumps({**GOOD, "source": {"a": 1}}).encode(): "source must be one of",
        json.dumps({**GOOD, "boxes": ["0,0,1,1"]}).encode(): "boxes must be text",
        json.dumps({**GOOD, "people": [2]}).encode(): "people must be 1 to 4, got [2]",
        json.dumps({**GOOD, "height": True}).encode(): "height must be an integer from 256 to 4096, got True",
        json.dumps({**GOOD, "width": 1024.5}).encode(): "width must be an integer",
        json.dumps({**GOOD, "width": 10**9}).encode(): "width must be an integer from 256 to 4096",
        json.dumps({**GOOD, "colour": "red"}).encode(): "unknown field(s) 'colour': the fields are width, height",
        json.dumps([GOOD]).encode(): "expected a JSON object",
        b"\xff\xfe\x00": "not JSON",
        b"": "not JSON",
        b'"text"': "expected a JSON object",
    }
    for body, message in cases.items():
        assert message in _refused(routes, body), body[:80]


def test_box_count_and_body_size_are_capped(routes):
    many = "\n".join(["10,10,50,50"] * 3_000_000)
    start = time.perf_counter()
    message = _refused(routes, {**GOOD, "boxes": many})
    assert "above 65536" in message and time.perf_counter() - start < 2.0  # not read, not parsed
    just = "\n".join(["10,10,50,50"] * (routes.MAX_BOXES + 1))
    assert f"more than {routes.MAX_BOXES} boxes given (line {routes.MAX_BOXES + 1}" in _refused(
        routes, {**GOOD, "boxes": just}
    )
    answer = routes.layout_response(
        json.dumps({**GOOD, "boxes": "\n".join(["10,10,50,50"] * routes.MAX_BOXES)}).encode()
    )
    assert len(answer["boxes"]) == len(answer["colors"]) == routes.MAX_BOXES
    # the node refuses the same text with the same message (one parser)
    from withanyone_core.layout import parse_boxes

    with pytest.raises(ValueError, match=f"more than {routes.MAX_BOXES} boxes given"):
        parse_boxes(many, 1024, 768)


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    4,
    5,
    255,
    256,
    768,
    4096,
    4097,
    10**400,
    -(10**30),
    0.5,
    768.0,
    1e308,
    float("nan"),
    float("inf"),
    "",
    "768",
    "preset",
    "text",
    "image",
    "mask",
    "lasso",
    [],
    ["text"],
    {},
    {"x": 1},
    "0,0,10,10",
    "nan,0,1,1",
    "0.1,0.2,0.4,0.6\n600 100 900 500",
    "1e400,0,2e400,5",
    "\x00",
    "5,5,1,1",
    "#\n\n",
    "0.5,0.5,1,2",
]


FIELD_VALUES = {
    "width": [256, 768, 1024.0, 4096],
    "height": [256, 512, 4096],
    "people": [1, 2, 3, 4],
    "source": ["preset", "text", "image", "mask"],
    "boxes": ["0.1,0.2,0.4,0.6\n600 100 900 500", "# c\n10 10 100 100", "0,0,1,1", "1,1,2e308,5"],
}


def test_random_bodies_are_answered_or_refused_never_crash(routes):
    """Random field values of every JSON type (and missing fields): an answer is valid JSON with finite boxes of
    the right count; anything else is a LayoutRequestError."""
    rng = random.Random(19)
    answered = refused = 0
    for _ in range(4000):
        # each field usually good (so whole bodies get through), else any value, or missing
        body = {
            k: rng.choice(FIELD_VALUES[k]) if rng.random() < 0.85 else rng.choice(VALUES)
            for k in routes.FIELDS
            if rng.random() < 0.97
        }
        raw = json.dumps(body).encode()  # NaN/Infinity literals included, as a browser could not but a client can
        try:
            answer = routes.layout_response(raw)
        except routes.LayoutRequestError as err:
            assert str(err) and len(str(err)) < 500
            refused += 1
            continue
        json.dumps(answer, allow_nan=False)
        assert len(answer["colors"]) >= len(answer["boxes"]) and len(answer["boxes"]) <= routes.MAX_BOXES
        answered += 1
    assert answered > 50 and refused > 1000
