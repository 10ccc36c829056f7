// The explorer page of `qkvtrace view`: selectors, search and the neighbour list; plotly draws the points.
// Data come from web.explorer_data: columns dictionary-encoded, coordinates and neighbours as base64 typed arrays.
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const gd = document.getElementById("figure");
const $ = id => document.getElementById(id);

function typed(b64, Type) {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}
const N = D.n, K = D.k;
const col = {};
for (const [name, c] of Object.entries(D.columns)) col[name] = {values: c.values, codes: typed(c.codes, Uint32Array)};
const coords = {};
for (const [key, b64] of Object.entries(D.coords)) coords[key] = typed(b64, Float32Array);  // (n, 2) row-major
const nbrIndex = typed(D.neighbours.index, Int32Array), nbrCos = typed(D.neighbours.cosine, Int16Array);
const val = (name, i) => col[name].values[col[name].codes[i]];
const word = i => (val("side", i) === "tgt" && val("transition", i)) ? val("transition", i) : val("token", i);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const patterns = new Map(D.patterns.map(p => [[p.epoch, p.sentence_id, p.site, p.layer].join("|"), p]));
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                 "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];

function fill(id, values, all) {
  $(id).innerHTML = (all ? '<option value="*">all</option>' : "") +
    values.map((v, j) => `<option value="${j}">${esc(v)}</option>`).join("");
}
fill("site", col.site.values); fill("layer", col.layer.values); fill("head", col.head.values);
fill("kind", col.kind.values, true);
$("method").innerHTML = D.methods.map(m => `<option value="${m}">${{pca: "PCA", umap: "UMAP", tsne: "t-SNE"}[m]}</option>`).join("");
$("color").innerHTML = Object.keys(col).map(c => `<option${c === "sentence" ? " selected" : ""}>${c}</option>`).join("");
const epochs = col.epoch.values;
$("epoch").max = epochs.length;
$("qk").disabled = !D.methods.some(m => coords[m + "|qk"]);

let rows = [], selected = -1;

function visible() {
  // Rows of the chosen space, kind and epoch that have coordinates under the chosen projection.
  const c = coords[$("method").value + ($("qk").checked ? "|qk" : "")];
  const site = +$("site").value, layer = +$("layer").value, head = +$("head").value;
  const kind = $("kind").value, e = +$("epoch").value;
  const out = [];
  if (!c) return out;
  for (let i = 0; i < N; i++) {
    if (col.site.codes[i] !== site || col.layer.codes[i] !== layer || col.head.codes[i] !== head) continue;
    if (kind !== "*" && col.kind.codes[i] !== +kind) continue;
    if (e > 0 && col.epoch.codes[i] !== e - 1) continue;
    if (Number.isNaN(c[2 * i])) continue;
    out.push(i);
  }
  return out;
}

function hover(i) {
  return `<b>${esc(D.labels[i])}</b><br>word ${esc(word(i))} · kind ${esc(val("kind", i))}<br>` +
    `${esc(val("site", i))} · layer ${val("layer", i)} · head ${esc(val("head", i))} · epoch ${val("epoch", i)}<br>` +
    `sentence "${esc(val("sentence", i))}"<br>position ${val("position", i)} · token ${esc(val("token", i))}`;
}

function matches() {
  const q = $("search").value.trim().toLowerCase();
  if (!q) return [];
  return rows.filter(i => word(i).toLowerCase() === q || D.labels[i].toLowerCase().includes(q));
}

function overlay(list, name, marker) {
  const c = coords[$("method").value + ($("qk").checked ? "|qk" : "")];
  return {type: "scattergl", mode: "markers", name, x: list.map(i => c[2 * i]), y: list.map(i => c[2 * i + 1]),
          customdata: list, hoverinfo: "skip", showlegend: false, marker, meta: {role: name}};
}

function draw() {
  const e = +$("epoch").value;
  $("epoch-value").textContent = e ? epochs[e - 1] : "all";
  const key = $("method").value + ($("qk").checked ? "|qk" : "");
  const c = coords[key];
  rows = visible();
  const by = $("color").value, groups = new Map();
  for (const i of rows) {
    const code = col[by].codes[i];
    if (!groups.has(code)) groups.set(code, []);
    groups.get(code).push(i);
  }
  const size = rows.length > 20000 ? 3 : rows.length > 2000 ? 5 : 8;
  const SYMBOLS = ["circle", "triangle-up", "square", "diamond", "triangle-down", "cross", "x", "star"];
  const symbols = list => list.map(i => SYMBOLS[col.kind.codes[i] % SYMBOLS.length]);  // one marker per kind
  const trace = (list, extra) => Object.assign({
    type: "scattergl", mode: "markers", x: list.map(i => c[2 * i]), y: list.map(i => c[2 * i + 1]),
    customdata: list, text: list.map(hover), hovertemplate: "%{text}<extra></extra>", meta: {role: "points"}}, extra);
  let traces;
  if (groups.size <= PALETTE.length) {
    traces = [...groups.keys()].sort((a, b) => a - b).map((code, j) => trace(groups.get(code), {
      name: String(col[by].values[code]).slice(0, 40),
      marker: {size, color: PALETTE[j % PALETTE.length], symbol: symbols(groups.get(code))}}));
  } else {  // too many values for a legend: one trace on a colour scale
    const numeric = typeof col[by].values[0] === "number";
    traces = [trace(rows, {name: by, showlegend: false, marker: {
      size, symbol: symbols(rows), color: rows.map(i => numeric ? val(by, i) : col[by].codes[i]), colorscale: "Turbo",
      showscale: numeric, colorbar: {title: {text: by}}}})];
  }
  const found = matches();
  $("matches").textContent = $("search").value.trim() ? `${found.length} match${found.length === 1 ? "" : "es"}` : "";
  traces.push(overlay(found, "search", {size: size + 10, color: "rgba(0,0,0,0)", line: {color: "#d62728", width: 2}}));
  const near = selected >= 0 && rows.includes(selected) ? neighbours(selected).filter(j => rows.includes(j)) : [];
  traces.push(overlay(near, "neighbours", {size: size + 6, color: "rgba(0,0,0,0)", line: {color: "#000", width: 1.5}}));
  $("params").textContent = (D.parameters[key] || {})[`${val("site", rows[0] ?? 0)} · layer ${val("layer", rows[0] ?? 0)} · head ${val("head", rows[0] ?? 0)}`] ||
    (rows.length ? "" : "no vectors for this choice");
  const layout = {margin: {l: 40, r: 10, t: 10, b: 30}, hovermode: "closest", template: "plotly_white",
                  legend: {title: {text: by}}, uirevision: key + $("site").value + $("layer").value + $("head").value,
                  xaxis: {zeroline: false}, yaxis: {zeroline: false}};
  return Plotly.react(gd, traces, layout, {displaylogo: false, responsive: true});
}

function neighbours(i) {
  const out = [];
  for (let j = 0; j < K; j++) if (nbrIndex[i * K + j] >= 0) out.push(nbrIndex[i * K + j]);
  return out;
}

function attentionRow(i) {
  // The row of the pattern where token i is the query, or its column where it is a key (e.g. cross-attention k).
  const p = patterns.get([val("epoch", i), val("sentence_id", i), val("site", i), val("layer", i)].join("|"));
  if (!p) return "";
  const pos = val("position", i), asQuery = D.query_side[val("site", i)] === val("side", i);
  const head = val("head", i), heads = head === "concat" ? p.pattern.map((_, h) => h) : [+head];
  const tokens = asQuery ? p.key_tokens : p.query_tokens;
  const cell = w => `<td style="background:rgba(31,119,180,${w})">${w.toFixed(2)}</td>`;
  const body = heads.map(h => `<tr><th>head ${h}</th>` + tokens.map((_, t) =>
    cell(asQuery ? p.pattern[h][pos][t] : p.pattern[h][t][pos])).join("") + "</tr>").join("");
  return `<h3>attention ${asQuery ? "of this query over the keys" : "this key receives from each query"}</h3>` +
    `<table><tr><th></th>${tokens.map(t => `<th>${esc(t)}</th>`).join("")}</tr>${body}</table>`;
}

function show(i) {
  selected = i;
  const items = neighbours(i).map(j => `<li data-row="${j}">${esc(D.labels[j])} <span class="muted">cos ` +
    `${(nbrCos[i * K + neighbours(i).indexOf(j)] / 10000).toFixed(3)} · "${esc(val("sentence", j))}"</span></li>`);
  $("side").innerHTML = `<h3>${esc(D.labels[i])}</h3><p>sentence "${esc(val("sentence", i))}"<br>word ` +
    `${esc(word(i))} · position ${val("position", i)} · ${esc(val("kind", i))} · epoch ${val("epoch", i)}</p>` +
    `<h3>${items.length} nearest by cosine (same kind and epoch)</h3><ol id="neighbours">${items.join("")}</ol>` +
    attentionRow(i);
  return draw();
}

for (const id of ["site", "layer", "head", "kind", "method", "qk", "color"]) $(id).addEventListener("change", draw);
$("epoch").addEventListener("input", draw);
$("search").addEventListener("input", draw);
draw().then(() => {
  gd.on("plotly_click", ev => {
    const p = ev.points.find(p => p.data.meta && p.data.meta.role === "points");
    if (p) show(p.customdata);
  });
  window.qkvReady = performance.now();  // tests and the time-to-interactive measurement wait for this
});
