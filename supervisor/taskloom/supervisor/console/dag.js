// A task's graph, drawn as a layered DAG from left to right in SVG.
//
// Layout: each subtask's layer is the longest chain of dependencies before it;
// within a layer, subtasks are ordered by the average position of what they
// depend on and of what depends on them (a few sweeps each way), so edges
// cross less. A layer of many subtasks wraps into several columns, so that a
// fan-out of a thousand stays a block rather than a line a mile long. The
// view pans (drag) and zooms (wheel, or the buttons); "fit" shows it all.

const SVG = "http://www.w3.org/2000/svg";
const W = 176, H = 44, GAP_X = 56, COL_X = 14, GAP_Y = 12;

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function clip(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

/** Positions for `nodes` ([{id, depends_on}]): {pos: Map(id → {x, y}), width, height}. */
export function layout(nodes) {
  const ids = new Set(nodes.map((n) => n.id));
  const deps = new Map(nodes.map((n) => [n.id, n.depends_on.filter((d) => ids.has(d))]));
  const dependents = new Map(nodes.map((n) => [n.id, []]));
  for (const [id, ds] of deps) for (const d of ds) dependents.get(d).push(id);

  // Longest path from the roots (Kahn's order; a cycle, which plans never
  // have, would leave nodes in layer 0).
  const layer = new Map(nodes.map((n) => [n.id, 0]));
  const waiting = new Map(nodes.map((n) => [n.id, deps.get(n.id).length]));
  const queue = nodes.filter((n) => waiting.get(n.id) === 0).map((n) => n.id);
  for (let i = 0; i < queue.length; i++) {
    const id = queue[i];
    for (const next of dependents.get(id)) {
      layer.set(next, Math.max(layer.get(next), layer.get(id) + 1));
      waiting.set(next, waiting.get(next) - 1);
      if (waiting.get(next) === 0) queue.push(next);
    }
  }
  const layers = [];
  for (const n of nodes) {
    const l = layer.get(n.id);
    while (layers.length <= l) layers.push([]);
    layers[l].push(n.id);
  }

  // Order within layers by barycenters, sweeping down and up.
  const index = new Map();
  const renumber = (ls) => ls.forEach((ids) => ids.forEach((id, i) => index.set(id, i / Math.max(1, ids.length - 1))));
  renumber(layers);
  const center = (id, neighbours) => {
    const ns = neighbours.get(id);
    if (!ns.length) return index.get(id);
    return ns.reduce((sum, n) => sum + index.get(n), 0) / ns.length;
  };
  for (let sweep = 0; sweep < 4; sweep++) {
    const down = sweep % 2 === 0;
    const order = down ? layers.keys() : [...layers.keys()].reverse();
    for (const l of order) {
      const by = down ? deps : dependents;
      const keys = new Map(layers[l].map((id) => [id, center(id, by)]));
      layers[l].sort((a, b) => keys.get(a) - keys.get(b));
      renumber([layers[l]]);
    }
  }

  // Columns: a layer wider than `per` subtasks wraps.
  const per = Math.max(16, Math.ceil(Math.sqrt(nodes.length) * 1.6));
  const pos = new Map();
  let x = 0, height = 0;
  const tallest = Math.min(per, Math.max(1, ...layers.map((ids) => ids.length)));
  for (const ids of layers) {
    const columns = Math.ceil(ids.length / per);
    const rows = Math.min(per, ids.length);
    const top = ((tallest - rows) * (H + GAP_Y)) / 2;
    ids.forEach((id, i) => {
      const column = Math.floor(i / per);
      pos.set(id, { x: x + column * (W + COL_X), y: top + (i % per) * (H + GAP_Y) });
    });
    x += columns * (W + COL_X) - COL_X + GAP_X;
    height = Math.max(height, top + rows * (H + GAP_Y));
  }
  return { pos, width: Math.max(W, x - GAP_X), height: Math.max(H, height - GAP_Y) };
}

/** An interactive drawing of a task's graph in an <svg>. */
export class Graph {
  constructor(svg, onSelect) {
    this.svg = svg;
    this.onSelect = onSelect;
    this.nodes = new Map();
    this.edges = [];
    this.view = { x: 0, y: 0, w: 800, h: 400 };
    this.bounds = { width: 800, height: 400 };
    this.selected = "";
    this._panning();
  }

  /** Draw `nodes` ([{id, title, capability, status, depends_on, requires_approval}]). */
  render(nodes) {
    const { pos, width, height } = layout(nodes);
    this.bounds = { width, height };
    this.svg.replaceChildren();
    this.nodes.clear();
    this.edges = [];
    const edges = el("g", { class: "edges" }, this.svg);
    const body = el("g", { class: "nodes" }, this.svg);
    for (const n of nodes) {
      const to = pos.get(n.id);
      for (const d of n.depends_on) {
        const from = pos.get(d);
        if (!from) continue;
        const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x, y2 = to.y + H / 2;
        const bend = Math.max(24, (x2 - x1) / 2);
        const path = el("path", {
          class: "edge", "data-from": d, "data-to": n.id,
          d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
        }, edges);
        this.edges.push(path);
      }
    }
    for (const n of nodes) {
      const p = pos.get(n.id);
      const g = el("g", {
        class: "node", transform: `translate(${p.x},${p.y})`,
        "data-subtask-id": n.id, "data-status": n.status,
      }, body);
      el("rect", { width: W, height: H, rx: 6 }, g);
      const title = el("text", { x: 8, y: 17 }, g);
      title.textContent = clip(n.title || n.id, 26);
      const sub = el("text", { x: 8, y: 34, class: "sub" }, g);
      sub.textContent = clip(`${n.id} · ${n.capability}${n.requires_approval ? " · gated" : ""}`, 30);
      const tip = el("title", {}, g);
      tip.textContent = `${n.id}: ${n.title}\n${n.status}`;
      g.addEventListener("click", (e) => { e.stopPropagation(); this.select(n.id); });
      this.nodes.set(n.id, g);
    }
    if (this.selected && !this.nodes.has(this.selected)) this.selected = "";
    this.select(this.selected, false);
    this.fit();
  }

  setStatus(id, status) {
    const g = this.nodes.get(id);
    if (!g) return false;
    g.setAttribute("data-status", status);
    const tip = g.querySelector("title");
    if (tip) tip.textContent = tip.textContent.replace(/\n.*$/, `\n${status}`);
    return true;
  }

  select(id, notify = true) {
    for (const g of this.nodes.values()) g.classList.remove("selected");
    for (const e of this.edges) e.classList.remove("hot");
    this.selected = id;
    if (!id || !this.nodes.has(id)) return;
    this.nodes.get(id).classList.add("selected");
    for (const e of this.edges) {
      if (e.dataset.from === id || e.dataset.to === id) e.classList.add("hot");
    }
    if (notify) this.onSelect(id);
  }

  fit() {
    const margin = 24;
    this.view = { x: -margin, y: -margin, w: this.bounds.width + 2 * margin, h: this.bounds.height + 2 * margin };
    this._apply();
  }

  zoom(factor, cx = null, cy = null) {
    const v = this.view;
    const x = cx ?? v.x + v.w / 2, y = cy ?? v.y + v.h / 2;
    const w = Math.min(Math.max(v.w * factor, 120), Math.max(this.bounds.width, 800) * 8);
    const h = (w * v.h) / v.w;
    this.view = { x: x - ((x - v.x) * w) / v.w, y: y - ((y - v.y) * h) / v.h, w, h };
    this._apply();
  }

  _apply() {
    const v = this.view;
    this.svg.setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
  }

  _point(event) {
    const r = this.svg.getBoundingClientRect();
    const sx = this.view.w / Math.max(1, r.width), sy = this.view.h / Math.max(1, r.height);
    const s = Math.max(sx, sy);
    return { x: this.view.x + (event.clientX - r.left) * s, y: this.view.y + (event.clientY - r.top) * s, s };
  }

  _panning() {
    let start = null;
    this.svg.addEventListener("wheel", (e) => {
      e.preventDefault();
      const p = this._point(e);
      this.zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, p.x, p.y);
    }, { passive: false });
    this.svg.addEventListener("mousedown", (e) => {
      start = { x: e.clientX, y: e.clientY, view: { ...this.view }, s: this._point(e).s };
      this.svg.classList.add("dragging");
    });
    window.addEventListener("mousemove", (e) => {
      if (!start) return;
      this.view = { ...start.view, x: start.view.x - (e.clientX - start.x) * start.s,
                    y: start.view.y - (e.clientY - start.y) * start.s };
      this._apply();
    });
    window.addEventListener("mouseup", () => { start = null; this.svg.classList.remove("dragging"); });
  }
}
