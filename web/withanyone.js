// WithAnyone for ComfyUI: frontend extension (served as /extensions/<pack folder>/withanyone.js).
//
// * WithAnyoneLayout: a layout editor in a DOM widget (a <canvas> of our own, so it works in the classic
//   LiteGraph renderer and in the Vue node renderer, "Nodes 2.0", alike). Drag a box to move it, drag a
//   corner to resize it, add and delete boxes, show the 16-px token grid (snapping to it) and a background
//   photo (the connected layout photo, else the last image generated downstream of this layout).
//   The `boxes` text widget stays the source of truth: the editor writes it (source becomes "text") and
//   typing redraws the editor, so saved workflows and the API format are unchanged. The boxes drawn are
//   always the server's answer for the widget values: POST /withanyone/layout runs the node's own parser
//   (withanyone_core/layout), so a bad line shows the node's error message before the graph is queued. The
//   latest answer is node.withanyoneLayout. When the layout feeds Apply WithAnyone / the sampler whose identities come from
//   an Identity Encode node, a box count that differs from the connected people is flagged below the
//   drawing (node.withanyoneCountWarning); the server refuses such a run before sampling.
// * WithAnyoneIdentityMetrics: after a run, the metric lines in a read-only text box and a small
//   copy-paste meter coloured by the mean CP (+1: a copy of the reference, -1: the ground truth).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LAYOUT_ROUTE = "/withanyone/layout";
const LAYOUT_INPUTS = ["width", "height", "source", "people", "boxes"];
const EDITOR_WIDGET = "withanyone_editor";
const EDITOR_HEIGHT = 300; // toolbar + drawing + message line
const BOXES_TEXT_HEIGHT = 92; // four lines of the boxes text area without a scroll bar
const DEBOUNCE_MS = 250;
const TOKEN_PX = 16; // one FLUX image token covers 16 x 16 output pixels
const MIN_BOX_PX = 16;
const HANDLE_PX = 7; // corner grip, in screen pixels
const ERROR_COLOR = "#ff5555";
const WARNING_COLOR = "#ffa533";
const NOTE_COLOR = "#aaaaaa";
const FRAME_COLOR = "rgb(40, 40, 48)";
// used only until the route answers with its palette (withanyone_core/layout's COLORS, then hues of their own)
const FALLBACK_COLORS = ["#ff6347", "#4196ff", "#50c878", "#ffc828"];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function boxColor(colors, k) {
  if (colors?.[k]) return colors[k];
  if (k < FALLBACK_COLORS.length) return FALLBACK_COLORS[k];
  return `hsl(${Math.round(((k - 4) * 137.5 + 300) % 360)}, 85%, 60%)`;
}

// --- the server's answer -------------------------------------------------------------------------

function layoutRequest(node) {
  const body = {};
  for (const name of LAYOUT_INPUTS) body[name] = widget(node, name)?.value;
  return body;
}

function isBox(box) {
  return Array.isArray(box) && box.length === 4 && box.every((v) => typeof v === "number" && Number.isFinite(v));
}

/** The route's JSON as node.withanyoneLayout; an answer of the wrong shape becomes an error, never a crash. */
function layoutFromAnswer(body, ok, status, data) {
  const fallback = { boxes: [], width: body.width, height: body.height, colors: null, note: null };
  if (!ok) return { ...fallback, error: data?.error ?? `layout preview failed (HTTP ${status})` };
  const valid = data && Array.isArray(data.boxes) && data.boxes.every(isBox) &&
    Number.isFinite(data.width) && data.width > 0 && Number.isFinite(data.height) && data.height > 0;
  if (!valid) return { ...fallback, error: `layout preview: the server's answer is not a layout (${JSON.stringify(data)?.slice(0, 120)})` };
  return { boxes: data.boxes, width: data.width, height: data.height, colors: data.colors ?? null,
           note: data.note ?? null, error: null };
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
    const data = await response.json().catch(() => null);
    result = layoutFromAnswer(body, response.ok, response.status, data);
  } catch (err) {
    result = { boxes: [], width: body.width, height: body.height, colors: null, note: null,
               error: `layout preview unavailable: ${err?.message ?? err}` };
  }
  if (request !== node.withanyoneRequest) return; // a newer request is on its way
  node.withanyoneLayout = result;
  const editor = node.withanyoneEditor;
  if (editor && !editor.drag) editor.draft = null; // the server's boxes replace the dragged ones
  updateCountWarning(node);
  redraw(node);
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

// --- the count check ------------------------------------------------------------------------------

const LAYOUT_CONSUMERS = new Set(["WithAnyoneApply", "WithAnyoneSampler"]);
const PERSON_INPUT = /^person_\d+$/;

function connectedPeople(consumer) {
  const slot = consumer.findInputSlot?.("identities");
  if (slot == null || slot < 0) return null;
  const encoder = consumer.getInputNode?.(slot);
  if (!encoder || encoder.type !== "WithAnyoneIdentityEncode") return null;
  // isInputConnected asks the graph's links (input.link is deprecated in the current frontend)
  return (encoder.inputs ?? []).filter((input, index) => PERSON_INPUT.test(input.name) &&
    encoder.isInputConnected(index)).length;
}

function countWarning(node) {
  const layout = node.withanyoneLayout;
  if (!layout || layout.error || layout.note || !node.graph) return null;
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

function updateCountWarning(node) {
  node.withanyoneCountWarning = countWarning(node);
  showMessage(node);
}

function updateAllCountWarnings(graph) {
  // links change after the connection callbacks; look once they are in place
  setTimeout(() => {
    for (const node of graph?.nodes ?? app.graph?.nodes ?? []) {
      if (node.type === "WithAnyoneLayout") updateCountWarning(node);
    }
  }, 0);
}

// --- editing the boxes text -----------------------------------------------------------------------

function isBoxLine(line) {
  const t = line.trim();
  return t.length > 0 && !t.startsWith("#");
}

function formatBox(box, fractions, width, height) {
  if (fractions) {
    const [x1, y1, x2, y2] = [box[0] / width, box[1] / height, box[2] / width, box[3] / height];
    return [x1, y1, x2, y2].map((v) => String(Math.round(Math.min(1, Math.max(0, v)) * 10000) / 10000)).join(",");
  }
  return box.map((v) => String(Math.round(v))).join(",");
}

function isFractionLine(line) {
  const values = line.replace(/;/g, ",").split(/[\s,]+/).filter(Boolean).map(Number);
  return values.length === 4 && values.every((v) => v >= 0 && v <= 1);
}

/**
 * The boxes text after an edit: box k is the k-th line that is not blank or a comment (the parser's order),
 * so comments and the pixel/fraction style of each line survive. `edit` is {index, box} (move/resize),
 * {add: box} or {remove: index}.
 */
function editBoxesText(text, edit, width, height) {
  const lines = String(text ?? "").split("\n");
  const boxLines = [];
  lines.forEach((line, i) => isBoxLine(line) && boxLines.push(i));
  if (edit.add) {
    const fractions = boxLines.length > 0 && boxLines.every((i) => isFractionLine(lines[i]));
    while (lines.length && !lines[lines.length - 1].trim()) lines.pop();
    lines.push(formatBox(edit.add, fractions, width, height));
  } else if (edit.remove != null) {
    lines.splice(boxLines[edit.remove], 1);
  } else {
    const i = boxLines[edit.index];
    lines[i] = formatBox(edit.box, isFractionLine(lines[i]), width, height);
  }
  return lines.join("\n");
}

function setWidgetValue(node, name, value) {
  const w = widget(node, name);
  if (!w || w.value === value) return;
  w.value = value;
  // the widget's own callback (wrapped: it schedules the layout request) and the graph's change tracking
  w.callback?.(value, app.canvas, node, null, null);
  node.onWidgetChanged?.(name, value, undefined, w);
}

/** Write an edit into the widgets: the boxes on screen become the text (source switches to "text"). */
function commitEdit(node, boxes, edit) {
  const layout = node.withanyoneLayout;
  const { width, height } = layout;
  let text;
  if (widget(node, "source")?.value === "text") {
    text = editBoxesText(widget(node, "boxes")?.value, edit, width, height);
  } else {
    // a preset: its boxes, edited, become the text
    text = boxes.map((box) => formatBox(box, false, width, height)).join("\n");
    setWidgetValue(node, "source", "text");
  }
  setWidgetValue(node, "boxes", text);
  node.graph?.setDirtyCanvas?.(true, true);
  app.graph?.change?.();
}

// --- the editor widget ----------------------------------------------------------------------------

function editorView(editor, layout) {
  const w = editor.canvas.clientWidth;
  const h = editor.canvas.clientHeight;
  const scale = Math.min(w / layout.width, h / layout.height);
  return { w, h, scale, ox: (w - layout.width * scale) / 2, oy: (h - layout.height * scale) / 2 };
}

function editableBoxes(node) {
  const layout = node.withanyoneLayout;
  if (!layout || layout.error || layout.note) return null;
  return node.withanyoneEditor?.draft ?? layout.boxes;
}

function backgroundUrl(node) {
  const slot = node.findInputSlot?.("layout_image");
  const photo = slot != null && slot >= 0 && node.isInputConnected(slot) ? node.getInputNode(slot) : null;
  if (photo) {
    const name = widget(photo, "image")?.value;
    if (typeof name === "string" && name) {
      const cut = name.lastIndexOf("/");
      const subfolder = cut >= 0 ? name.slice(0, cut) : "";
      const filename = (cut >= 0 ? name.slice(cut + 1) : name).replace(/ \[(input|output|temp)\]$/, "");
      return api.apiURL(`/view?filename=${encodeURIComponent(filename)}&type=input&subfolder=${encodeURIComponent(subfolder)}`);
    }
    if (photo.imgs?.[0]?.src) return photo.imgs[0].src;
  }
  return node.withanyoneEditor?.generatedUrl ?? null;
}

function backgroundImage(node) {
  const editor = node.withanyoneEditor;
  if (!editor.photoToggle.checked) return null;
  const url = backgroundUrl(node);
  if (url !== editor.backgroundUrl) {
    editor.backgroundUrl = url;
    editor.background = null;
    if (url) {
      const img = new Image();
      img.onload = () => {
        if (editor.backgroundUrl === url) {
          editor.background = img;
          redraw(node);
        }
      };
      img.src = url;
    }
  }
  return editor.background;
}

function drawGrid(ctx, view, layout) {
  ctx.strokeStyle = "rgba(255, 255, 255, 0.13)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let x = TOKEN_PX; x < layout.width; x += TOKEN_PX) {
    const sx = Math.round(view.ox + x * view.scale) + 0.5;
    ctx.moveTo(sx, view.oy);
    ctx.lineTo(sx, view.oy + layout.height * view.scale);
  }
  for (let y = TOKEN_PX; y < layout.height; y += TOKEN_PX) {
    const sy = Math.round(view.oy + y * view.scale) + 0.5;
    ctx.moveTo(view.ox, sy);
    ctx.lineTo(view.ox + layout.width * view.scale, sy);
  }
  ctx.stroke();
}

function drawEditor(node) {
  const editor = node.withanyoneEditor;
  const { canvas } = editor;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  if (!cssW || !cssH) return;
  // backing store at the on-screen size (the classic canvas scales DOM widgets with its zoom)
  const rect = canvas.getBoundingClientRect();
  const density = (window.devicePixelRatio || 1) * Math.max(1, rect.width / cssW);
  const bw = Math.round(cssW * density);
  const bh = Math.round(cssH * density);
  if (canvas.width !== bw || canvas.height !== bh) {
    canvas.width = bw;
    canvas.height = bh;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(density, 0, 0, density, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const layout = node.withanyoneLayout;
  if (!layout || !(layout.width > 0 && layout.height > 0)) {
    ctx.fillStyle = NOTE_COLOR;
    ctx.font = "12px sans-serif";
    ctx.fillText("layout preview…", 8, 18);
    return;
  }
  const view = editorView(editor, layout);
  const iw = layout.width * view.scale;
  const ih = layout.height * view.scale;
  ctx.fillStyle = FRAME_COLOR;
  ctx.fillRect(view.ox, view.oy, iw, ih);
  const background = backgroundImage(node);
  if (background) {
    ctx.globalAlpha = 0.75;
    ctx.drawImage(background, view.ox, view.oy, iw, ih);
    ctx.globalAlpha = 1;
  }
  if (editor.gridToggle.checked) drawGrid(ctx, view, layout);
  if (layout.error) {
    ctx.strokeStyle = ERROR_COLOR;
    ctx.lineWidth = 2;
    ctx.strokeRect(view.ox + 1, view.oy + 1, iw - 2, ih - 2);
    return;
  }
  const boxes = editableBoxes(node) ?? [];
  ctx.font = "bold 13px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  boxes.forEach(([x1, y1, x2, y2], k) => {
    const color = boxColor(layout.colors, k);
    const sx = view.ox + x1 * view.scale;
    const sy = view.oy + y1 * view.scale;
    const sw = (x2 - x1) * view.scale;
    const sh = (y2 - y1) * view.scale;
    ctx.fillStyle = color;
    ctx.globalAlpha = k === editor.selected ? 0.28 : 0.14;
    ctx.fillRect(sx, sy, sw, sh);
    ctx.globalAlpha = 1;
    ctx.strokeStyle = color;
    ctx.lineWidth = k === editor.selected ? 3 : 2;
    ctx.strokeRect(sx, sy, sw, sh);
    ctx.fillText(String(k + 1), sx + 4, sy + 3);
    if (k === editor.selected) {
      for (const [cx, cy] of [[sx, sy], [sx + sw, sy], [sx, sy + sh], [sx + sw, sy + sh]]) {
        ctx.fillRect(cx - HANDLE_PX / 2, cy - HANDLE_PX / 2, HANDLE_PX, HANDLE_PX);
      }
    }
  });
}

function redraw(node) {
  if (!node.withanyoneEditor) return;
  fitVueBoxesText(node);
  try {
    drawEditor(node);
  } catch (err) {
    // a drawing bug must not take the node down with it: say so where the user looks
    node.withanyoneEditor.drawError = `layout editor: ${err?.message ?? err}`;
    console.error("[WithAnyone] layout editor", err);
  }
  showMessage(node);
}

function showMessage(node) {
  const editor = node.withanyoneEditor;
  if (!editor) return;
  const layout = node.withanyoneLayout;
  let text = "";
  let color = NOTE_COLOR;
  if (editor.drawError) [text, color] = [editor.drawError, ERROR_COLOR];
  else if (layout?.error) [text, color] = [layout.error, ERROR_COLOR];
  else if (node.withanyoneCountWarning) [text, color] = [node.withanyoneCountWarning, WARNING_COLOR];
  else if (layout?.note) text = layout.note;
  else if (layout) {
    const n = layout.boxes.length;
    text = `${n} face box${n === 1 ? "" : "es"} · ${layout.width}×${layout.height} · drag to move, corners to resize`;
  }
  editor.message.textContent = text;
  editor.message.style.color = color;
  editor.message.title = text;
  const editable = !!editableBoxes(node);
  editor.addButton.disabled = !editable;
  editor.removeButton.disabled = !editable || !(editableBoxes(node)?.length > 1);
}

function toImage(editor, layout, event) {
  const rect = editor.canvas.getBoundingClientRect();
  const px = (event.clientX - rect.left) * (editor.canvas.clientWidth / rect.width);
  const py = (event.clientY - rect.top) * (editor.canvas.clientHeight / rect.height);
  const view = editorView(editor, layout);
  return { x: (px - view.ox) / view.scale, y: (py - view.oy) / view.scale, view };
}

/** What a pointer at image point p grabs: a corner of the selected (then any) box, else the smallest box. */
function hitTest(boxes, p, selected) {
  const grip = (HANDLE_PX + 3) / p.view.scale;
  const order = selected >= 0 ? [selected, ...boxes.keys()] : [...boxes.keys()];
  for (const k of order) {
    const [x1, y1, x2, y2] = boxes[k];
    for (const [corner, cx, cy] of [["nw", x1, y1], ["ne", x2, y1], ["sw", x1, y2], ["se", x2, y2]]) {
      if (Math.abs(p.x - cx) <= grip && Math.abs(p.y - cy) <= grip) return { index: k, corner };
    }
  }
  let best = null;
  boxes.forEach(([x1, y1, x2, y2], k) => {
    if (p.x >= x1 && p.x <= x2 && p.y >= y1 && p.y <= y2) {
      const area = (x2 - x1) * (y2 - y1);
      if (!best || area < best.area) best = { index: k, corner: null, area };
    }
  });
  return best;
}

function snap(v, on) {
  return on ? Math.round(v / TOKEN_PX) * TOKEN_PX : v;
}

function dragBox(start, corner, dx, dy, layout, snapOn) {
  let [x1, y1, x2, y2] = start;
  const W = layout.width;
  const H = layout.height;
  if (!corner) {
    const w = x2 - x1;
    const h = y2 - y1;
    const nx = Math.min(Math.max(0, snap(x1 + dx, snapOn)), W - w);
    const ny = Math.min(Math.max(0, snap(y1 + dy, snapOn)), H - h);
    return [nx, ny, nx + w, ny + h];
  }
  if (corner.includes("w")) x1 = Math.min(Math.max(0, snap(x1 + dx, snapOn)), x2 - MIN_BOX_PX);
  if (corner.includes("e")) x2 = Math.max(Math.min(W, snap(x2 + dx, snapOn)), x1 + MIN_BOX_PX);
  if (corner.includes("n")) y1 = Math.min(Math.max(0, snap(y1 + dy, snapOn)), y2 - MIN_BOX_PX);
  if (corner.includes("s")) y2 = Math.max(Math.min(H, snap(y2 + dy, snapOn)), y1 + MIN_BOX_PX);
  return [x1, y1, x2, y2];
}

const CURSORS = { nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize" };

function bindPointer(node, editor) {
  const { canvas } = editor;
  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return; // middle/right buttons stay the canvas's (pan, menu)
    // the editor owns this gesture: neither the node drag nor the canvas selection sees it
    event.stopPropagation();
    event.preventDefault();
    canvas.focus({ preventScroll: true });
    const boxes = editableBoxes(node);
    if (!boxes) return;
    const layout = node.withanyoneLayout;
    const p = toImage(editor, layout, event);
    const hit = hitTest(boxes, p, editor.selected);
    editor.selected = hit ? hit.index : -1;
    if (hit) {
      editor.drag = { index: hit.index, corner: hit.corner, start: boxes[hit.index].slice(), x: p.x, y: p.y,
                      moved: false, boxes: boxes.map((b) => b.slice()) };
      canvas.setPointerCapture?.(event.pointerId);
    }
    redraw(node);
  });
  canvas.addEventListener("pointermove", (event) => {
    const layout = node.withanyoneLayout;
    if (!layout || layout.error || layout.note) return;
    const p = toImage(editor, layout, event);
    const drag = editor.drag;
    if (!drag) {
      const hit = hitTest(editableBoxes(node) ?? [], p, editor.selected);
      canvas.style.cursor = hit ? (hit.corner ? CURSORS[hit.corner] : "move") : "default";
      return;
    }
    event.stopPropagation();
    event.preventDefault();
    const box = dragBox(drag.start, drag.corner, p.x - drag.x, p.y - drag.y, layout, editor.gridToggle.checked);
    drag.moved = drag.moved || box.some((v, i) => Math.round(v) !== Math.round(drag.start[i]));
    editor.draft = drag.boxes.map((b, k) => (k === drag.index ? box : b));
    redraw(node);
  });
  const finish = (event) => {
    const drag = editor.drag;
    if (!drag) return;
    event.stopPropagation();
    editor.drag = null;
    canvas.releasePointerCapture?.(event.pointerId);
    if (drag.moved && editor.draft) {
      commitEdit(node, editor.draft, { index: drag.index, box: editor.draft[drag.index] });
    } else {
      editor.draft = null;
    }
    redraw(node);
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  canvas.addEventListener("keydown", (event) => {
    if ((event.key === "Delete" || event.key === "Backspace") && editor.selected >= 0) {
      event.stopPropagation();
      event.preventDefault();
      removeBox(node);
    }
  });
}

function addBox(node) {
  const boxes = editableBoxes(node);
  if (!boxes) return;
  const { width, height } = node.withanyoneLayout;
  const side = Math.max(MIN_BOX_PX, Math.round(Math.min(width, height) / 4 / TOKEN_PX) * TOKEN_PX);
  // left to right at head height, after the last box; wraps to the left edge
  const last = boxes[boxes.length - 1];
  let x1 = last ? last[2] + side / 4 : (width - side) / 2;
  if (x1 + side > width) x1 = Math.max(0, Math.min(width - side, side / 4));
  const y1 = Math.max(0, Math.min(height - side, last ? last[1] : height * 0.25));
  const box = [x1, y1, x1 + side, y1 + side];
  node.withanyoneEditor.selected = boxes.length;
  commitEdit(node, [...boxes, box], { add: box });
}

function removeBox(node) {
  const boxes = editableBoxes(node);
  if (!boxes || boxes.length < 2) return; // the parser wants at least one box
  const editor = node.withanyoneEditor;
  const index = editor.selected >= 0 && editor.selected < boxes.length ? editor.selected : boxes.length - 1;
  editor.selected = -1;
  commitEdit(node, boxes.filter((_, k) => k !== index), { remove: index });
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.style.cssText = "font:11px sans-serif;padding:1px 7px;border-radius:4px;border:1px solid #555;" +
    "background:#2b2b33;color:#ddd;cursor:pointer;";
  b.addEventListener("pointerdown", (e) => e.stopPropagation());
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return b;
}

function toggle(label, title, checked, onChange) {
  const wrap = document.createElement("label");
  wrap.title = title;
  wrap.style.cssText = "display:flex;align-items:center;gap:3px;font:11px sans-serif;color:#ccc;cursor:pointer;";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = checked;
  box.style.margin = "0";
  box.addEventListener("pointerdown", (e) => e.stopPropagation());
  box.addEventListener("change", onChange);
  wrap.append(box, label);
  return [wrap, box];
}

function setupEditor(node) {
  const container = document.createElement("div");
  container.className = "withanyone-layout-editor";
  container.style.cssText = "display:flex;flex-direction:column;gap:3px;width:100%;height:100%;min-height:0;" +
    "box-sizing:border-box;padding:2px 0;";
  const toolbar = document.createElement("div");
  toolbar.style.cssText = "display:flex;align-items:center;gap:6px;flex:0 0 auto;flex-wrap:wrap;";
  const canvas = document.createElement("canvas");
  canvas.className = "withanyone-layout-canvas";
  canvas.tabIndex = 0; // Delete removes the selected box
  canvas.style.cssText = "flex:1 1 auto;width:100%;min-height:120px;display:block;outline:none;touch-action:none;" +
    "border-radius:4px;background:#1c1c22;";
  const message = document.createElement("div");
  message.className = "withanyone-layout-message";
  message.style.cssText = "flex:0 0 auto;font:11px/14px sans-serif;min-height:14px;max-height:42px;overflow:hidden;" +
    "white-space:normal;overflow-wrap:anywhere;";
  const editor = (node.withanyoneEditor = { container, canvas, message, selected: -1, drag: null, draft: null,
                                            background: null, backgroundUrl: null, generatedUrl: null,
                                            drawError: null });
  editor.addButton = button("+ face", "add a face box (the next person)", () => addBox(node));
  editor.removeButton = button("− face", "delete the selected face box (or the last one); Delete key", () => removeBox(node));
  [editor.gridLabel, editor.gridToggle] = toggle("grid", "show the 16-px token grid and snap boxes to it", false,
                                                 () => redraw(node));
  [editor.photoLabel, editor.photoToggle] = toggle("photo", "the layout photo (or the last image made with this " +
                                                   "layout) behind the boxes", true, () => redraw(node));
  toolbar.append(editor.addButton, editor.removeButton, editor.gridLabel, editor.photoLabel);
  container.append(toolbar, canvas, message);
  bindPointer(node, editor);
  new ResizeObserver(() => redraw(node)).observe(canvas);

  const w = node.addDOMWidget(EDITOR_WIDGET, "withanyone_layout_editor", container, {
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => EDITOR_HEIGHT,
    hideOnZoom: false,
    serialize: false,
  });
  w.serialize = false;
  if (w.options) w.options.serialize = false;
  editor.widget = w;
}

/** Grow a text area so that `lines` lines fit without a scroll bar (its own font and padding decide). */
function fitLines(textarea, lines) {
  const style = getComputedStyle(textarea);
  const lineHeight = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.25 || 15;
  const extra = ["paddingTop", "paddingBottom", "borderTopWidth", "borderBottomWidth"]
    .reduce((sum, key) => sum + (parseFloat(style[key]) || 0), 0);
  const needed = `${Math.ceil(lines * lineHeight + extra)}px`;
  if (textarea.style.minHeight !== needed) textarea.style.minHeight = needed;
}

/** The Vue renderer draws its own boxes text area: find it in the node's element once it is mounted. */
function fitVueBoxesText(node) {
  const element = node.withanyoneEditor?.container.closest?.("[data-node-id]");
  const textarea = element?.querySelector("textarea");
  if (textarea) fitLines(textarea, 4);
}

function setupBoxesText(node) {
  const boxes = widget(node, "boxes");
  if (!boxes?.options) return;
  // four lines visible: the text area never shrinks below them
  const minHeight = boxes.options.getMinHeight;
  boxes.options.getMinHeight = () => Math.max(BOXES_TEXT_HEIGHT, minHeight?.() ?? 0);
  // the DOM widget's element (inputEl is its deprecated name in newer frontends)
  const textarea = boxes.element ?? boxes.inputEl;
  if (textarea) textarea.style.minHeight = `${BOXES_TEXT_HEIGHT - 8}px`;
}

function setupLayoutNode(node) {
  node.withanyoneLayout = null;
  for (const name of LAYOUT_INPUTS) wrapCallback(node, widget(node, name));
  if (!widget(node, EDITOR_WIDGET)) {
    setupBoxesText(node);
    setupEditor(node);
    const [minWidth, minHeight] = node.computeSize();
    node.setSize([Math.max(node.size[0], minWidth, 360), Math.max(node.size[1], minHeight)]);
  }
  scheduleLayout(node);
}

/** The nodes downstream of a layout node (through any chain of links), for "the last image made with it". */
function isDownstream(layoutNode, nodeId) {
  const seen = new Set();
  const queue = [layoutNode];
  while (queue.length && seen.size < 500) {
    const node = queue.shift();
    for (let slot = 0; slot < (node.outputs?.length ?? 0); slot++) {
      for (const next of node.getOutputNodes?.(slot) ?? []) {
        if (seen.has(next.id)) continue;
        if (String(next.id) === String(nodeId)) return true;
        seen.add(next.id);
        queue.push(next);
      }
    }
  }
  return false;
}

function rememberGeneratedImage({ detail }) {
  const images = detail?.output?.images;
  if (!Array.isArray(images) || !images.length || !app.graph) return;
  const { filename, subfolder = "", type = "output" } = images[0];
  if (!filename) return;
  for (const node of app.graph.nodes ?? []) {
    if (node.type !== "WithAnyoneLayout" || !node.withanyoneEditor) continue;
    if (!isDownstream(node, detail.display_node ?? detail.node)) continue;
    node.withanyoneEditor.generatedUrl = api.apiURL(
      `/view?filename=${encodeURIComponent(filename)}&type=${encodeURIComponent(type)}` +
      `&subfolder=${encodeURIComponent(subfolder)}&t=${Date.now()}`);
    redraw(node);
  }
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

const COUNT_CHECK_NODES = new Set(["WithAnyoneIdentityEncode", ...LAYOUT_CONSUMERS]);

app.registerExtension({
  name: "WithAnyone.Frontend",
  setup() {
    api.addEventListener("executed", rememberGeneratedImage);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === "WithAnyoneLayout") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupLayoutNode(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        scheduleLayout(this); // a loaded workflow sets the widget values without callbacks
      });
      chain(nodeType.prototype, "onConnectionsChange", function () {
        updateAllCountWarnings(this.graph);
        redraw(this); // the layout photo may have come or gone
      });
      chain(nodeType.prototype, "onRemoved", function () {
        clearTimeout(this.withanyoneTimer);
      });
    } else if (COUNT_CHECK_NODES.has(nodeData?.name)) {
      chain(nodeType.prototype, "onConnectionsChange", function () {
        updateAllCountWarnings(this.graph);
      });
    }
    if (nodeData?.name === "WithAnyoneIdentityMetrics") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupMetricsNode(this);
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        showMetrics(this, message);
      });
    }
  },
});
