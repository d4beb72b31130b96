"""ComfyUI workflows as data: build UI-format workflows, convert them to API format, check them.

A workflow in ``example_workflows/`` is what the ComfyUI frontend saves and loads (nodes with
``widgets_values``, links as ``[id, from, slot, to, slot, type]``). ComfyUI's server runs
API-format prompts (``{id: {class_type, inputs}}``); the frontend converts between them
using each node's definition from ``/object_info``, and so does :func:`ui_to_api`:
widget values follow the definition's input order, with the extra value the frontend
stores after a seed with ``control_after_generate`` and after an ``image_upload`` combo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NODE_WIDTH = 320
# frontend-only nodes: saved in the workflow, never sent to the server
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote"}


def _ordered_inputs(definition: dict) -> list[tuple[str, str, list]]:
    """(name, 'required'|'optional', spec) in the definition's input order."""
    order = definition.get("input_order") or {k: list(v) for k, v in definition["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, section, definition["input"][section][name]))
    return out


def _input_type(spec: list) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_choices(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else _options(spec).get("options", [])


def is_widget(spec: list) -> bool:
    return _input_type(spec) in WIDGET_TYPES


def _extra_widget_value(spec: list):
    """The value the frontend stores after this widget (seed control / upload button), if any."""
    options = _options(spec)
    if options.get("control_after_generate"):
        return "fixed"
    if options.get("image_upload"):
        return "image"
    return None


@dataclass
class Output:
    node_id: int
    slot: int


@dataclass
class NodeRef:
    node_id: int
    outputs: list[str]

    def out(self, which: int | str = 0) -> Output:
        return Output(self.node_id, which if isinstance(which, int) else self.outputs.index(which))


@dataclass
class Graph:
    """Build a UI-format workflow against node definitions from /object_info."""

    object_info: dict
    nodes: list[dict] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    def add(self, class_type: str, pos: tuple[float, float], title: str | None = None, **values) -> NodeRef:
        if class_type not in self.object_info:
            raise KeyError(f"{class_type} is not a node the server knows")
        definition = self.object_info[class_type]
        node_id = len(self.nodes) + 1
        inputs, widgets_values = [], []
        known = {name for name, _, _ in _ordered_inputs(definition)}
        unknown = set(values) - known
        if unknown:
            raise KeyError(f"{class_type} has no input(s) {sorted(unknown)}")
        for name, section, spec in _ordered_inputs(definition):
            value = values.get(name)
            if isinstance(value, Output):
                link_id = len(self.links) + 1
                source = self.nodes[value.node_id - 1]
                out_type = source["outputs"][value.slot]["type"]
                self.links.append([link_id, value.node_id, value.slot, node_id, len(inputs), out_type])
                source["outputs"][value.slot]["links"].append(link_id)
                entry = {"name": name, "type": _input_type(spec), "link": link_id}
                if is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
                if not is_widget(spec):
                    continue
                value = None
            elif not is_widget(spec):
                if section == "required":
                    raise ValueError(f"{class_type}.{name} ({_input_type(spec)}) must be connected")
                inputs.append({"name": name, "type": _input_type(spec), "link": None})
                continue
            if value is None:
                value = self._default(class_type, name, spec)
            widgets_values.append(value)
            extra = _extra_widget_value(spec)
            if extra is not None:
                widgets_values.append(extra)
        outputs = [
            {"name": out_name, "type": out_type, "links": [], "slot_index": slot}
            for slot, (out_type, out_name) in enumerate(zip(definition["output"], definition["output_name"]))
        ]
        node = {
            "id": node_id,
            "type": class_type,
            "pos": [float(pos[0]), float(pos[1])],
            "size": [NODE_WIDTH, 60 + 26 * (len(inputs) + len(widgets_values))],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets_values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return NodeRef(node_id, list(definition["output_name"]))

    @staticmethod
    def _default(class_type: str, name: str, spec: list):
        options = _options(spec)
        if "default" in options:
            return options["default"]
        choices = _combo_choices(spec)
        if _input_type(spec) == "COMBO" and choices:
            return choices[0]
        raise ValueError(f"{class_type}.{name}: give a value (no default)")

    def note(
        self, text: str, pos: tuple[float, float], size: tuple[float, float] = (520, 300), title: str = "Read me"
    ) -> None:
        """A MarkdownNote (the frontend's own note node with Markdown; not sent to the server)."""
        node_id = len(self.nodes) + 1
        self.nodes.append(
            {
                "id": node_id,
                "type": "MarkdownNote",
                "pos": [float(pos[0]), float(pos[1])],
                "size": [float(size[0]), float(size[1])],
                "flags": {},
                "order": node_id - 1,
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "title": title,
                "properties": {},
                "widgets_values": [text],
                "color": "#432",
                "bgcolor": "#653",
            }
        )

    def group(self, title: str, node_refs: list[NodeRef], color: str = "#3f789e") -> None:
        chosen = [self.nodes[r.node_id - 1] for r in node_refs]
        x1 = min(n["pos"][0] for n in chosen) - 20
        y1 = min(n["pos"][1] for n in chosen) - 50
        x2 = max(n["pos"][0] + n["size"][0] for n in chosen) + 20
        y2 = max(n["pos"][1] + n["size"][1] for n in chosen) + 20
        self.groups.append({"title": title, "bounding": [x1, y1, x2 - x1, y2 - y1], "color": color, "flags": {}})

    def to_ui(self, note: str = "") -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "withanyone_note": note},
            "version": 0.4,
        }


def version_neutral(workflow: dict, object_info: dict) -> dict:
    """A copy of ``workflow`` for comparing workflows built on different ComfyUIs: output nodes (``output_node``
    in their definition) lose their unlinked outputs. Output nodes gain output sockets across versions (Save and
    Preview Image have an ``IMAGE`` output since ComfyUI 0.26), and the frontend gives a loaded node the sockets
    of the running server's definition, so an unlinked one says nothing about the workflow."""
    import copy

    out = copy.deepcopy(workflow)
    for node in out["nodes"]:
        if object_info.get(node["type"], {}).get("output_node"):
            node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend would send for ``workflow`` (active nodes only)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in VIRTUAL_NODE_TYPES:  # muted (2), bypassed (4), notes
            continue
        class_type = node["type"]
        if class_type not in object_info:
            raise KeyError(f"node {node['id']}: {class_type} is not installed on this server")
        definition = object_info[class_type]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        position = 0
        for name, _, spec in _ordered_inputs(definition):
            if not is_widget(spec):
                continue
            if position >= len(values):
                raise ValueError(f"node {node['id']} ({class_type}): no widget value for {name!r}")
            inputs[name] = values[position]
            position += 1 + (_extra_widget_value(spec) is not None)
        if position != len(values):
            raise ValueError(f"node {node['id']} ({class_type}): {len(values)} widget values, expected {position}")
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, source, slot, _, _, _ = links[entry["link"]]
                inputs[entry["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt


def check_api(prompt: dict, object_info: dict) -> list[str]:
    """Problems a server would reject ``prompt`` for: unknown nodes/inputs, missing required
    inputs, link types that do not match, values outside a widget's range or choices."""
    problems = []
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        definition = object_info.get(class_type)
        if definition is None:
            problems.append(f"node {node_id}: unknown node {class_type}")
            continue
        specs = {name: (section, spec) for name, section, spec in _ordered_inputs(definition)}
        where = f"node {node_id} ({class_type})"
        for name in set(node["inputs"]) - set(specs):
            problems.append(f"{where}: unknown input {name!r}")
        for name, (section, spec) in specs.items():
            value = node["inputs"].get(name)
            kind = _input_type(spec)
            if value is None:
                if section == "required":
                    problems.append(f"{where}: required input {name!r} missing")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{where}: {name!r} links to missing node {value[0]}")
                    continue
                out_type = object_info[source["class_type"]]["output"][value[1]]
                if kind not in ("*", out_type) and out_type != "*":
                    problems.append(f"{where}: {name!r} takes {kind}, linked to {out_type}")
                continue
            options = _options(spec)
            if kind == "COMBO":
                choices = _combo_choices(spec)
                if value not in choices:
                    problems.append(f"{where}: {name!r} = {value!r} not among {choices[:8]}")
            elif kind in ("INT", "FLOAT"):
                if (
                    not isinstance(value, (int, float))
                    or isinstance(value, bool)
                    or (kind == "INT" and not isinstance(value, int))
                ):
                    problems.append(f"{where}: {name!r} = {value!r} is not {kind}")
                elif not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"{where}: {name!r} = {value} outside [{options.get('min')}, {options.get('max')}]")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name!r} = {value!r} is not text")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name!r} = {value!r} is not a boolean")
    return problems


# --------------------------------------------------------------------------- thumbnails
THUMBNAIL_SIZE = (512, 512)  # the template cards show a square picture
_CAPTION_HEIGHT = 150
_LINK_COLORS = {
    "MODEL": "#b39ddb",
    "CLIP": "#ffd500",
    "VAE": "#ff6e6e",
    "CONDITIONING": "#ffa931",
    "LATENT": "#ff9cf9",
    "IMAGE": "#64b5f6",
    "MASK": "#81c784",
    "INT": "#29699c",
    "SIGMAS": "#cdffcd",
    "NOISE": "#b0b0b0",
    "GUIDER": "#66ffff",
    "SAMPLER": "#ecb4b4",
}
_WITHANYONE_COLOR = "#e08eff"


def _title_color(node: dict) -> str:
    kind = node["type"]
    if kind in VIRTUAL_NODE_TYPES:
        return "#665533"
    if kind.startswith("WithAnyone"):
        return "#5b3a7a"
    if kind.endswith("Loader") or kind.startswith("Load"):
        return "#2a4d6e"
    return "#3a3a3a"


def _wrap(draw, text: str, font, width: float, lines: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
            if len(out) == lines:
                break
    if line and len(out) < lines:
        out.append(line)
    return out


def render_thumbnail(workflow: dict, title: str, description: str, size: tuple[int, int] = THUMBNAIL_SIZE):
    """A picture of the graph (groups, nodes, links coloured by type, as the canvas draws them) over a caption
    with the workflow's title and description. Deterministic for a given Pillow: the build script writes it, the
    server test compares it with a fresh rendering."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    graph_h = height - _CAPTION_HEIGHT
    image = Image.new("RGBA", size, "#1e1e1e")
    draw = ImageDraw.Draw(image)
    for gx in range(8, width, 16):  # the canvas' dot grid
        for gy in range(8, graph_h, 16):
            draw.point((gx, gy), fill="#2c2c2c")
    nodes = workflow["nodes"]
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes]
    boxes += [
        (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2], g["bounding"][1] + g["bounding"][3])
        for g in workflow.get("groups", [])
    ]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = 12
    scale = min((width - 2 * margin) / (x1 - x0), (graph_h - 2 * margin) / (y1 - y0))
    ox = (width - (x1 - x0) * scale) / 2 - x0 * scale
    oy = (graph_h - (y1 - y0) * scale) / 2 - y0 * scale

    def at(x, y):
        return x * scale + ox, y * scale + oy

    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    for group in workflow.get("groups", []):
        gx, gy, gw, gh = group["bounding"]
        color = group.get("color", "#3f789e").lstrip("#")
        rgb = tuple(int(color[i : i + 2], 16) for i in (0, 2, 4)) if len(color) == 6 else (63, 120, 158)
        shade.rectangle([*at(gx, gy), *at(gx + gw, gy + gh)], fill=(*rgb, 70), outline=(*rgb, 200))
    image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    by_id = {n["id"]: n for n in nodes}

    def slot_y(node, slot):
        return node["pos"][1] + 14 + 22 * slot

    for _, source, out_slot, target, in_slot, kind in workflow.get("links", []):
        a, b = by_id[source], by_id[target]
        (sx, sy), (tx, ty) = (at(a["pos"][0] + a["size"][0], slot_y(a, out_slot)), at(b["pos"][0], slot_y(b, in_slot)))
        bend = max(20.0, abs(tx - sx) * 0.5)
        points = []
        for k in range(25):  # cubic bezier, as the canvas' spline links
            t = k / 24
            u = 1 - t
            points.append(
                (
                    u**3 * sx + 3 * u * u * t * (sx + bend) + 3 * u * t * t * (tx - bend) + t**3 * tx,
                    u**3 * sy + 3 * u * u * t * sy + 3 * u * t * t * ty + t**3 * ty,
                )
            )
        color = _LINK_COLORS.get(kind, _WITHANYONE_COLOR if kind.startswith("WITHANYONE") else "#999999")
        draw.line(points, fill=color, width=2)
    font_size = max(7, min(14, round(22 * scale)))
    font = ImageFont.load_default(size=font_size)
    for node in nodes:
        nx, ny = node["pos"]
        nw, nh = node["size"]
        left, top = at(nx, ny - 30)
        right, bottom = at(nx + nw, ny + nh)
        body = "#4a4a2a" if node["type"] in VIRTUAL_NODE_TYPES else "#353535"
        draw.rounded_rectangle([left, top, right, bottom], radius=3, fill=body, outline="#111111")
        draw.rounded_rectangle([left, top, right, at(nx, ny)[1]], radius=3, fill=_title_color(node))
        label = node.get("title") or node["type"]
        while label and draw.textlength(label, font=font) > right - left - 4:
            label = label[:-1]
        draw.text((left + 2, top + 1), label, fill="#dddddd", font=font)
    draw.rectangle([0, graph_h, width, height], fill="#101010")
    draw.line([(0, graph_h), (width, graph_h)], fill=_WITHANYONE_COLOR, width=3)
    title_font, text_font = ImageFont.load_default(size=30), ImageFont.load_default(size=17)
    y = graph_h + 12
    for line in _wrap(draw, title, title_font, width - 28, 2):
        draw.text((14, y), line, fill="#ffffff", font=title_font)
        y += 34
    for line in _wrap(draw, description, text_font, width - 28, max(1, (height - y - 6) // 21)):
        draw.text((14, y + 2), line, fill="#bdbdbd", font=text_font)
        y += 21
    return image.convert("RGB")


def thumbnail_jpeg(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88, optimize=False)
    return buffer.getvalue()
