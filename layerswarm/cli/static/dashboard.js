// The swarm page: polls /dashboard/state every 2 s and redraws.
"use strict";
const $ = (id) => document.getElementById(id);
const { el } = layerswarm;

function drawCoverage(state) {
  const bar = $("coverage"), axis = $("coverage-axis");
  const counts = state.coverage.counts, most = Math.max(1, ...counts);
  bar.replaceChildren(...counts.map((n, layer) => {
    const cell = el("div", n ? "layer" : "layer gap", String(n));
    cell.title = `layer ${layer}: ${n} peer${n === 1 ? "" : "s"}`;
    if (n) cell.style.background = `hsl(142, 60%, ${70 - 30 * n / most}%)`;
    return cell;
  }));
  axis.replaceChildren(...counts.map((_, layer) => el("div", "", layer % 5 ? "" : String(layer))));
  const gaps = state.coverage.gaps;
  $("coverage-verdict").textContent = gaps.length
    ? "unserved: " + gaps.map(([a, b]) => `${a}:${b}`).join(", ")
    : `every layer is served (fewest replicas: ${Math.min(...counts)})`;
  $("coverage").dataset.gaps = String(gaps.length);
}

function drawPeers(state) {
  const body = $("peers").querySelector("tbody");
  body.replaceChildren(...state.peers.map((p) => {
    const tr = el("tr", "peer");
    tr.dataset.state = p.state;
    const cells = [
      [p.short_id, ""], [p.address, ""], [p.reach, "reach-" + p.reach],
      [`${p.span[0]}:${p.span[1]}`, ""],
      [p.state, "state-" + p.state], [p.device, ""], [p.dtype, ""],
      [`${layerswarm.bytes(p.memory_free)} / ${layerswarm.bytes(p.memory_total)}`, "num"],
      [p.steps_per_s_per_layer ? p.steps_per_s_per_layer.toFixed(1) : "?", "num"],
      [`${p.cache_free} / ${p.cache_total}`, "num"], [String(p.load), "num"],
      [String(p.queued_tokens), "num"],
    ];
    for (const [text, cls] of cells) tr.append(el("td", cls, text));
    tr.title = p.peer_id;
    return tr;
  }));
  const live = state.peers.filter((p) => p.state === "live").length;
  $("peer-count").textContent = `${live} live of ${state.peers.length}`;
}

function drawRoutes(state) {
  const items = state.routes.map((r) => el("li", "route",
    `#${r.id} (${r.steps} steps, ${r.age_s.toFixed(0)} s): ` +
    (r.hops.length ? r.hops.map((h) => `${h.address.split("/")[0]} [${h.span[0]}:${h.span[1]})`).join(" → ")
                   : "every layer in this process")));
  $("routes").replaceChildren(...(items.length ? items : [el("li", "quiet", "none now")]));
}

function drawEvents(state) {
  const items = state.events.slice(0, 20).map((e) => {
    const li = el("li");
    li.append(el("span", "kind kind-" + e.kind, e.kind),
              el("span", "quiet", new Date(e.at * 1000).toLocaleTimeString() + "  "),
              el("span", "", e.text));
    return li;
  });
  $("events").replaceChildren(...(items.length ? items : [el("li", "quiet", "nothing yet")]));
}

function drawRate(state) {
  const canvas = $("rate"), ctx = canvas.getContext("2d");
  const points = state.tokens_per_s, w = canvas.width, h = canvas.height;
  const top = Math.max(1, ...points.map((p) => p[1]));
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#3b82f6"; ctx.lineWidth = 2; ctx.beginPath();
  points.forEach(([, v], i) => {
    const x = (i / Math.max(1, points.length - 1)) * w, y = h - 14 - (v / top) * (h - 24);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#94a3b8"; ctx.font = "11px sans-serif";
  const now = points.length ? points[points.length - 1][1] : 0;
  ctx.fillText(`peak ${top.toFixed(1)} tok/s, now ${now.toFixed(1)}`, 6, h - 3);
}

async function refresh() {
  try {
    const reply = await layerswarm.fetch("/dashboard/state");
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    const state = await reply.json();
    $("model").textContent = `${state.model}: ${state.num_layers} layers`;
    $("chat-link").hidden = !state.chat;
    drawCoverage(state); drawPeers(state); drawRoutes(state); drawEvents(state); drawRate(state);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("updated").textContent = "cannot reach the server: " + e.message;
  }
}
refresh();
setInterval(refresh, 2000);
