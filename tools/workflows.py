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
        outputs = [{"name": out_name, "type": out_type, "links": [], "slot_index": slot}
                   for slot, (out_type, out_name) in enumerate(zip(definition["output"], definition["output_name"]))]
        node = {"id": node_id, "type": class_type, "pos": [float(pos[0]), float(pos[1])],
                "size": [NODE_WIDTH, 60 + 26 * (len(inputs) + len(widgets_values))], "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": class_type}, "widgets_values": widgets_values}
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

    def group(self, title: str, node_refs: list[NodeRef], color: str = "#3f789e") -> None:
        chosen = [self.nodes[r.node_id - 1] for r in node_refs]
        x1 = min(n["pos"][0] for n in chosen) - 20
        y1 = min(n["pos"][1] for n in chosen) - 50
        x2 = max(n["pos"][0] + n["size"][0] for n in chosen) + 20
        y2 = max(n["pos"][1] + n["size"][1] for n in chosen) + 20
        self.groups.append({"title": title, "bounding": [x1, y1, x2 - x1, y2 - y1], "color": color, "flags": {}})

    def to_ui(self, note: str = "") -> dict:
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "withanyone_note": note},
            "version": 0.4,
        }


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend would send for ``workflow`` (active nodes only)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:  # muted (2) or bypassed (4)
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
                if not isinstance(value, (int, float)) or isinstance(value, bool) or (
                        kind == "INT" and not isinstance(value, int)):
                    problems.append(f"{where}: {name!r} = {value!r} is not {kind}")
                elif not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"{where}: {name!r} = {value} outside [{options.get('min')}, {options.get('max')}]")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name!r} = {value!r} is not text")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name!r} = {value!r} is not a boolean")
    return problems

