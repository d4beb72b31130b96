// WithAnyone for ComfyUI: frontend extension (served as /extensions/<pack folder>/withanyone.js).
//
// * WithAnyoneLayout: a live preview of the numbered face boxes, drawn on the node and refreshed
//   (debounced) whenever width/height/source/people/boxes change. The boxes come from the server route
//   POST /withanyone/layout, which runs nodes/layout.py's own parser, so a bad line shows the node's
//   error message (in red) before the graph is queued. The latest result is node.withanyoneLayout.
//   When the layout feeds Apply WithAnyone / WithAnyone Sampler whose identities come from an Identity
//   Encode node, a box count that differs from the connected people is flagged on the node before the
//   run (node.withanyoneCountWarning); the server refuses such a run before sampling.
// * WithAnyoneIdentityMetrics: after a run, the metric lines in a read-only text box and a small
//   copy-paste meter coloured by the mean CP (+1: a copy of the reference, -1: the ground truth).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LAYOUT_ROUTE = "/withanyone/layout";
const LAYOUT_INPUTS = ["width", "height", "source", "people", "boxes"];
const PREVIEW_WIDGET = "withanyone_preview";
const PREVIEW_HEIGHT = 220;
const DEBOUNCE_MS = 250;
const ERROR_COLOR = "#ff5555";
// used only until the route answers with nodes/layout.py's COLORS
const FALLBACK_COLORS = ["#ff6347", "#4196ff", "#50c878", "#ffc828"];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function layoutRequest(node) {
  const body = {};
  for (const name of LAYOUT_INPUTS) body[name] = widget(node, name)?.value;
  return body;
}

async function refreshLayout(node) {
  const body = layoutRequest(node);
  const request = (node.withanyoneRequest = (node.withanyoneRequest ?? 0) + 1);
  let result;
  try {
    const response = await api.fetchApi(LAYOUT_ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (response.ok) {
      result = { boxes: data.boxes, width: data.width, height: data.height, colors: data.colors,
                 note: data.note ?? null, error: null };
    } else {
      result = { boxes: [], width: body.width, height: body.height,
                 error: data.error ?? `layout preview failed (HTTP ${response.status})` };
    }
  } catch (err) {
    result = { boxes: [], width: body.width, height: body.height,
               error: `layout preview unavailable: ${err?.message ?? err}` };
  }
  if (request !== node.withanyoneRequest) return; // a newer request is on its way
  node.withanyoneLayout = result;
  node.setDirtyCanvas?.(true, false);
}

function scheduleLayout(node) {
  clearTimeout(node.withanyoneTimer);
  node.withanyoneTimer = setTimeout(() => refreshLayout(node), DEBOUNCE_MS);
}

function wrapCallback(node, w) {
  if (!w || w.withanyoneWrapped) return;
  const original = w.callback;
  w.callback = function (...args) {
    const out = original?.apply(this, args);
    scheduleLayout(node);
    return out;
  };
  w.withanyoneWrapped = true;
}

function wrapText(ctx, text, maxWidth) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(candidate).width > maxWidth) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    lines.push(line);
  }
  return lines;
}

function drawMessage(ctx, text, color, x, y, w, h) {
  ctx.fillStyle = color;
  ctx.font = "12px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const lines = wrapText(ctx, text, w - 12);
  lines.slice(0, Math.max(1, Math.floor((h - 8) / 15))).forEach((line, k) => {
    ctx.fillText(line, x + 6, y + 6 + k * 15);
  });
}

const LAYOUT_CONSUMERS = new Set(["WithAnyoneApply", "WithAnyoneSampler"]);
const WARNING_COLOR = "#ffa533";

function connectedPeople(consumer) {
  const slot = consumer.findInputSlot?.("identities");
  if (slot == null || slot < 0) return null;
  const encoder = consumer.getInputNode?.(slot);
  if (!encoder || encoder.type !== "WithAnyoneIdentityEncode") return null;
  return (encoder.inputs ?? []).filter((input) => /^person_\d+$/.test(input.name) && input.link != null).length;
}

function countWarning(node) {
  const layout = node.withanyoneLayout;
  if (!layout || layout.error || layout.note) return null;
  const boxes = layout.boxes.length;
  for (const consumer of node.getOutputNodes?.(0) ?? []) {
    if (!LAYOUT_CONSUMERS.has(consumer.type)) continue;
    const people = connectedPeople(consumer);
    if (people != null && people !== boxes) {
      return `${boxes} face box${boxes === 1 ? "" : "es"} but ${people} ${people === 1 ? "person is" : "people are"} ` +
        `connected to Identity Encode: box k is person k, give one box per person`;
    }
  }
  return null;
}

function drawLayoutPreview(node, ctx) {
  node.withanyoneCountWarning = countWarning(node);
  const spacer = widget(node, PREVIEW_WIDGET);
  if (node.flags?.collapsed || !spacer || spacer.y == null) return;
  const x = 10;
  const y = spacer.y;
  const w = node.size[0] - 20;
  const h = Math.min((spacer.computedHeight ?? PREVIEW_HEIGHT) - 4, node.size[1] - y - 6);
  if (w < 20 || h < 20) return;
  const layout = node.withanyoneLayout;
  ctx.save();
  if (!layout) {
    drawMessage(ctx, "layout preview…", "#888", x, y, w, h);
  } else if (layout.error) {
    ctx.strokeStyle = ERROR_COLOR;
    ctx.lineWidth = 1;
    ctx.strokeRect(x, y, w, h);
    drawMessage(ctx, layout.error, ERROR_COLOR, x, y, w, h);
  } else if (layout.note) {
    drawMessage(ctx, layout.note, "#aaa", x, y, w, h);
  } else {
    // the image's aspect ratio, centred in the preview area; same look as layout.draw_preview
    const scale = Math.min(w / layout.width, h / layout.height);
    const iw = layout.width * scale;
    const ih = layout.height * scale;
    const ox = x + (w - iw) / 2;
    const oy = y + (h - ih) / 2;
    ctx.fillStyle = "rgb(40, 40, 48)";
    ctx.fillRect(ox, oy, iw, ih);
    const colors = layout.colors?.length ? layout.colors : FALLBACK_COLORS;
    ctx.lineWidth = 2;
    ctx.font = "bold 12px sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    layout.boxes.forEach(([x1, y1, x2, y2], k) => {
      const color = colors[k % colors.length];
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.strokeRect(ox + x1 * scale, oy + y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale);
      ctx.fillText(String(k + 1), ox + x1 * scale + 4, oy + y1 * scale + 3);
    });
    if (node.withanyoneCountWarning) {
      ctx.strokeStyle = WARNING_COLOR;
      ctx.lineWidth = 1;
      ctx.strokeRect(x, y, w, h);
      drawMessage(ctx, node.withanyoneCountWarning, WARNING_COLOR, x, y, w, h);
    }
  }
  ctx.restore();
}

function setupLayoutNode(node) {
  node.withanyoneLayout = null;
  for (const name of LAYOUT_INPUTS) wrapCallback(node, widget(node, name));
  if (!widget(node, PREVIEW_WIDGET)) {
    // reserves room below the widgets; the drawing happens in onDrawForeground
    node.addCustomWidget({
      name: PREVIEW_WIDGET,
      type: PREVIEW_WIDGET,
      value: null,
      serialize: false,
      options: { serialize: false },
      draw() {},
      computeSize(width) {
        return [width ?? 0, PREVIEW_HEIGHT];
      },
    });
    const [minWidth, minHeight] = node.computeSize();
    node.setSize([Math.max(node.size[0], minWidth), Math.max(node.size[1], minHeight)]);
  }
  scheduleLayout(node);
}

// --- identity metrics ---------------------------------------------------------------------------

function meanCP(lines) {
  const values = [];
  for (const line of lines) {
    const match = /\bCP ([+-]?\d+(?:\.\d+)?)/.exec(line);
    if (match) values.push(Number(match[1]));
  }
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

function cpColor(cp) {
  // -1 (like the ground truth) green, 0 amber, +1 (a copy of the reference) red
  const t = Math.min(1, Math.max(0, (cp + 1) / 2));
  return `hsl(${Math.round(120 * (1 - t))}, 75%, 45%)`;
}

function setupMetricsNode(node) {
  const container = document.createElement("div");
  container.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
  const text = document.createElement("textarea");
  text.readOnly = true;
  text.placeholder = "identity metrics appear here after a run";
  text.className = "comfy-multiline-input";
  text.style.cssText = "flex:1;min-height:60px;resize:none;font:11px monospace;";
  const meter = document.createElement("div");
  meter.className = "withanyone-cp-meter";
  meter.style.cssText = "display:none;position:relative;height:18px;border-radius:4px;background:#333;" +
    "overflow:hidden;font:11px sans-serif;color:#fff;";
  const fill = document.createElement("div");
  fill.style.cssText = "position:absolute;left:0;top:0;bottom:0;";
  const label = document.createElement("span");
  label.style.cssText = "position:relative;padding-left:6px;line-height:18px;";
  meter.append(fill, label);
  container.append(text, meter);
  const w = node.addDOMWidget("metrics", "withanyone_metrics", container, {
    getValue: () => text.value,
    setValue: (value) => {
      text.value = value ?? "";
    },
    getMinHeight: () => 100,
    serialize: false,
  });
  w.serialize = false;
  if (w.options) w.options.serialize = false;
  const [minWidth, minHeight] = node.computeSize();
  node.setSize([Math.max(node.size[0], minWidth, 400), Math.max(node.size[1], minHeight)]);
  node.withanyoneMetricsElements = { text, meter, fill, label };
  node.withanyoneMetrics = null;
}

function showMetrics(node, message) {
  const elements = node.withanyoneMetricsElements;
  const lines = (message?.text ?? []).flatMap((t) => String(t).split("\n")).filter((l) => l.length);
  const cp = meanCP(lines);
  node.withanyoneMetrics = { lines, meanCP: cp, color: cp == null ? null : cpColor(cp) };
  if (!elements) return;
  elements.text.value = lines.join("\n");
  if (cp == null) {
    elements.meter.style.display = "none";
  } else {
    elements.meter.style.display = "block";
    elements.fill.style.width = `${Math.round(Math.min(1, Math.max(0, (cp + 1) / 2)) * 100)}%`;
    elements.fill.style.background = node.withanyoneMetrics.color;
    const sign = cp >= 0 ? "+" : "";
    elements.label.textContent = `copy-paste: mean CP ${sign}${cp.toFixed(3)}`;
    elements.meter.title = "CP +1: a copy of the reference photo, -1: like the ground truth";
  }
  node.setDirtyCanvas?.(true, false);
}

// --- registration -------------------------------------------------------------------------------

function chain(prototype, method, after) {
  const original = prototype[method];
  prototype[method] = function (...args) {
    const out = original?.apply(this, args);
    after.apply(this, args);
    return out;
  };
}

app.registerExtension({
  name: "WithAnyone.Frontend",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === "WithAnyoneLayout") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupLayoutNode(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        scheduleLayout(this); // a loaded workflow sets the widget values without callbacks
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawLayoutPreview(this, ctx);
      });
      chain(nodeType.prototype, "onRemoved", function () {
        clearTimeout(this.withanyoneTimer);
      });
    } else if (nodeData?.name === "WithAnyoneIdentityMetrics") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupMetricsNode(this);
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        showMetrics(this, message);
      });
    }
  },
});
