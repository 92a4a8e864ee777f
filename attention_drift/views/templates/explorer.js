/* attention_drift views (explorer.py): the drift explorer and the per-head pattern panels.
   Plain JavaScript and SVG, no dependencies, no network; inlined once per page.
   Each view is a div of class ad-explorer (id ID, data-kind "explorer" or "patterns") followed
   by two script elements, ID-data (the JSON payload) and ID-blob (base64 of the numbers,
   zlib-compressed when payload.blob.deflate); ADExplorer.start(ID) decodes them and draws. */
(function () {
  "use strict";
  if (window.ADExplorer) return;
  const SVGNS = "http://www.w3.org/2000/svg";
  let uid = 0;

  // ------------------------------------------------------------------ DOM helpers
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    return e;
  }
  function el(tag, attrs, ...kids) {
    const e = setAttrs(document.createElement(tag), attrs);
    for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
    return e;
  }
  function sv(tag, attrs, parent) {
    const e = setAttrs(document.createElementNS(SVGNS, tag), attrs);
    if (parent) parent.append(e);
    return e;
  }
  function tip(e, text) {
    const t = document.createElementNS(SVGNS, "title");
    t.textContent = text;
    e.append(t);
    return e;
  }

  // ------------------------------------------------------------------ numbers
  const fin = Number.isFinite;
  function fmt(x, d = 3) { return fin(x) ? x.toFixed(d) : "–"; }
  function sfmt(x, d = 3) { return fin(x) ? (x < 0 ? "−" : "+") + Math.abs(x).toFixed(d) : "–"; }
  function pfmt(lp) {
    const p = Math.exp(lp);
    return !fin(p) ? "–" : p >= 0.001 ? p.toFixed(3) : p.toExponential(1);
  }
  function tokenLabel(t) { return String(t).replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/ /g, "␣") || "∅"; }
  function headName(l, h) { return "L" + l + "H" + h; }
  function maxAbs(values, keep) {
    let m = 0;
    for (let i = 0; i < values.length; i++) if ((!keep || keep(i)) && fin(values[i])) m = Math.max(m, Math.abs(values[i]));
    return m;
  }

  // ------------------------------------------------------------------ decoding
  function b64(text) {
    const bin = atob(text.trim());
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  async function inflate(bytes) {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream, needed to unpack the data; " +
                      "open the page in a recent Chrome, Firefox or Safari");
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  function half(u) {
    const sign = u & 0x8000 ? -1 : 1, e = (u >> 10) & 0x1f, f = u & 0x3ff;
    if (e === 0) return sign * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : sign * Infinity;
    return sign * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function reader(buffer) {
    return function (ref) {
      if (!ref) return null;
      const { o, n, t } = ref;
      if (t === "f4") return new Float32Array(buffer, o, n);
      const out = new Float32Array(n);
      if (t === "f2") {
        const u = new Uint16Array(buffer, o, n);
        for (let i = 0; i < n; i++) out[i] = half(u[i]);
      } else if (t === "q8") {
        const u = new Uint8Array(buffer, o, n);
        for (let i = 0; i < n; i++) out[i] = (u[i] / 255) * (u[i] / 255);
      } else {
        throw new Error("unknown array type " + t);
      }
      return out;
    };
  }
  /* A [q, q] pattern from its stored values: the lower triangle (q(q+1)/2 values, NaN above
     the diagonal) or the full matrix. */
  function square(values, q) {
    if (values.length === q * q) return values;
    if (values.length !== (q * (q + 1)) / 2) throw new Error("a pattern does not fit its " + q + " tokens");
    const out = new Float32Array(q * q).fill(NaN);
    let k = 0;
    for (let i = 0; i < q; i++) for (let j = 0; j <= i; j++) out[i * q + j] = values[k++];
    return out;
  }

  // ------------------------------------------------------------------ colours
  const BLUES = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
                 [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]];
  const RDBU = [[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240], [247, 247, 247],
                [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43], [103, 0, 31]];
  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    const x = t * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
    return "rgb(" + c.join(",") + ")";
  }
  /* scale: {signed, max}; signed scales run -max..+max (blue: negative, red: positive). */
  function colour(scale, v) {
    if (!fin(v)) return "#e4e4e4";
    return scale.signed ? ramp(RDBU, 0.5 + v / (2 * scale.max)) : ramp(BLUES, v / scale.max);
  }
  function beyond(scale, v) { return fin(v) && (scale.signed ? Math.abs(v) : v) > scale.max * 1.0001; }
  function legend(scale, caption) {
    const stops = scale.signed ? RDBU : BLUES;
    const css = stops.map((c, i) => `rgb(${c.join(",")}) ${(100 * i / (stops.length - 1)).toFixed(1)}%`).join(",");
    const lo = scale.signed ? sfmt(-scale.max) : "0", hi = scale.signed ? sfmt(scale.max) : fmt(scale.max);
    const bar = el("div", { class: "ad-legend" },
      el("span", { class: "ad-lo", text: lo }),
      el("span", { class: "ad-bar", style: `background:linear-gradient(to right,${css})` }),
      el("span", { class: "ad-hi", text: hi }));
    if (scale.signed) bar.append(el("span", { class: "ad-zero", text: "0 at the centre" }));
    return el("div", { class: "ad-legend-box" }, bar, caption ? el("div", { class: "ad-caption", text: caption }) : null);
  }

  // ------------------------------------------------------------------ attention matrix
  /* One [q, q] attention matrix (rows: query positions, columns: keys) with token labels; the
     measured cell (query row -> subject column) outlined; cells beyond the colour scale dotted. */
  function matrix(o) {
    const q = o.tokens.length, labels = o.tokens.map(tokenLabel);
    const cell = Math.max(7, Math.min(14, Math.floor(220 / q)));
    const font = Math.max(8, Math.min(11, cell - 2));
    const longest = Math.max(1, ...labels.map(s => s.length));
    const left = Math.min(190, 10 + longest * font * 0.6), top = Math.min(160, 10 + longest * font * 0.5);
    const W = Math.ceil(left + q * cell + 10), H = Math.ceil(top + q * cell + 10);
    const fig = el("figure", { class: "ad-matrix", "data-panel": o.key });
    fig.append(el("figcaption", { text: o.title }));
    const svg = sv("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": o.title }, fig);
    const g = sv("g", { transform: `translate(${left.toFixed(1)},${top.toFixed(1)})` }, svg);
    for (let i = 0; i < q; i++) {
      for (let j = 0; j < q; j++) {
        const v = o.values[i * q + j];
        if (!fin(v)) continue;
        const r = sv("rect", { x: j * cell, y: i * cell, width: cell, height: cell, fill: colour(o.scale, v) }, g);
        tip(r, `query ${i} ${labels[i]} → key ${j} ${labels[j]}: ${o.scale.signed ? sfmt(v, 4) : fmt(v, 4)}`);
        if (beyond(o.scale, v)) sv("circle", { cx: j * cell + cell / 2, cy: i * cell + cell / 2, r: Math.max(1.5, cell * 0.16), class: "ad-clip" }, g);
      }
    }
    for (let i = 0; i < q; i++) {
      const cls = i === o.query ? "ad-tok ad-tok-query" : "ad-tok";
      sv("text", { x: -5, y: i * cell + cell / 2, "text-anchor": "end", "dominant-baseline": "central", "font-size": font, class: cls }, g)
        .textContent = labels[i];
    }
    for (let j = 0; j < q; j++) {
      const cls = j === o.subject ? "ad-tok ad-tok-subject" : "ad-tok";
      const x = j * cell + cell / 2;
      sv("text", { x: x, y: -5, transform: `rotate(-55 ${x} -5)`, "font-size": font, class: cls }, g).textContent = labels[j];
    }
    sv("rect", { x: 0, y: o.query * cell, width: q * cell, height: cell, class: "ad-band" }, g);
    if (o.subject !== null && o.subject !== undefined) {
      sv("rect", { x: o.subject * cell, y: 0, width: cell, height: q * cell, class: "ad-band" }, g);
      const v = o.values[o.query * q + o.subject];
      tip(sv("rect", { x: o.subject * cell, y: o.query * cell, width: cell, height: cell, class: "ad-measured",
                       "data-measured": `${o.query},${o.subject}` }, g),
          `measured cell: prediction position ${labels[o.query]} → subject's last token ${labels[o.subject]}: ` +
          (o.scale.signed ? sfmt(v, 4) : fmt(v, 4)));
    }
    return fig;
  }

  /* The prediction row alone as bars (before, after, and optionally a second after). */
  function rowBars(tokens, query, subject, rows, scale) {
    const n = query + 1, labels = tokens.slice(0, n).map(tokenLabel);
    const group = Math.max(10, Math.min(30, Math.floor(640 / n))), bw = (group - 2) / rows.length;
    const font = Math.max(8, Math.min(12, group - 4));
    const longest = Math.max(1, ...labels.map(s => s.length));
    const left = 44, plotH = 110, bottom = Math.min(150, 12 + longest * font * 0.55);
    const W = left + n * group + 10, H = 10 + plotH + bottom;
    const fig = el("figure", { class: "ad-rowbars", "data-panel": "row" });
    fig.append(el("figcaption", { text: "prediction row (the row drift measures): attention of " +
      tokenLabel(tokens[query]) + " to each earlier token" }));
    const svg = sv("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` }, fig);
    const g = sv("g", { transform: `translate(${left},10)` }, svg);
    const y = v => plotH * (1 - Math.min(v, scale.max) / scale.max);
    sv("line", { x1: 0, x2: n * group, y1: plotH, y2: plotH, class: "ad-axis" }, g);
    sv("line", { x1: 0, x2: 0, y1: 0, y2: plotH, class: "ad-axis" }, g);
    for (const t of [0, scale.max / 2, scale.max]) {
      sv("text", { x: -4, y: y(t), "text-anchor": "end", "dominant-baseline": "central", "font-size": 10 }, g).textContent = fmt(t, 2);
    }
    if (subject !== null && subject !== undefined) {
      sv("rect", { x: subject * group, y: 0, width: group, height: plotH, class: "ad-band-fill" }, g);
    }
    for (let j = 0; j < n; j++) {
      rows.forEach((row, k) => {
        const v = row.values[j];
        if (!fin(v)) return;
        const bar = sv("rect", { x: j * group + 1 + k * bw, y: y(v), width: bw, height: plotH - y(v), fill: row.colour }, g);
        tip(bar, `${row.label}: ${labels[j]} ${fmt(v, 4)}`);
        if (v > scale.max) sv("text", { x: j * group + 1 + (k + 0.5) * bw, y: -1, "text-anchor": "middle", "font-size": 9 }, g).textContent = "▲";
      });
      const x = j * group + group / 2;
      sv("text", { x: x, y: plotH + 6, transform: `rotate(55 ${x} ${plotH + 6})`, "font-size": font,
                   class: j === subject ? "ad-tok ad-tok-subject" : "ad-tok" }, g).textContent = labels[j];
    }
    const key = el("div", { class: "ad-keys" });
    for (const row of rows) key.append(el("span", { class: "ad-key" }, el("i", { style: `background:${row.colour}` }), row.label));
    fig.append(key);
    return fig;
  }

  /* A head's before / after / difference panels on one prompt. p: {tokens, query, subject,
     before, after (full [q*q]), others: [{label, after}]}; includeFirst: whether the first
     token's column sets the colour scale. */
  function patternPanels(p, includeFirst) {
    const q = p.tokens.length;
    const notFirst = i => includeFirst || i % q !== 0;
    const afters = [p.after, ...p.others.map(o => o.after)];
    let top = Math.max(maxAbs(p.before, notFirst), ...afters.map(a => maxAbs(a, notFirst)));
    if (!(top > 0)) top = Math.max(maxAbs(p.before), ...afters.map(a => maxAbs(a))) || 1;
    const seq = { signed: false, max: top };
    const diffs = afters.map(a => a.map((v, i) => v - p.before[i]));
    const m = Math.max(...diffs.map(d => maxAbs(d, notFirst))) || Math.max(...diffs.map(d => maxAbs(d))) || 1;
    const div = { signed: true, max: m };
    const firstMax = Math.max(...[p.before, ...afters].map(a => maxAbs(a, i => i % q === 0)));
    const box = el("div", { class: "ad-panels" });
    const row = el("div", { class: "ad-row" });
    const labels = p.labels || ["before the edit", "after the edit"];
    row.append(matrix({ key: "before", title: labels[0], tokens: p.tokens, values: p.before, scale: seq, query: p.query, subject: p.subject }));
    row.append(matrix({ key: "after", title: labels[1], tokens: p.tokens, values: p.after, scale: seq, query: p.query, subject: p.subject }));
    row.append(matrix({ key: "diff", title: "after − before", tokens: p.tokens, values: diffs[0], scale: div, query: p.query, subject: p.subject }));
    p.others.forEach((o, k) => {
      row.append(matrix({ key: "after-" + (k + 1), title: "after: " + o.label, tokens: p.tokens, values: o.after, scale: seq, query: p.query, subject: p.subject }));
      row.append(matrix({ key: "diff-" + (k + 1), title: o.label + " − before", tokens: p.tokens, values: diffs[k + 1], scale: div, query: p.query, subject: p.subject }));
    });
    box.append(row);
    const note = includeFirst ? "scale includes the first token" :
      `scale leaves out the first token (column 0, ${tokenLabel(p.tokens[0])}), which gets up to ${fmt(firstMax)}`;
    box.append(el("div", { class: "ad-row" },
      legend(seq, `attention, 0 to ${fmt(top)} (${note}); white dots: cells beyond the scale`),
      legend(div, "after − before: blue = attention lost after the edit, red = attention gained")));
    box.append(el("p", { class: "ad-note", text: "Outlined cell: the measured cell, prediction row " +
      tokenLabel(p.tokens[p.query]) + " → " + (p.subject === null ? "—" : "subject's last token " + tokenLabel(p.tokens[p.subject])) +
      ". Rows are query positions, columns key positions." }));
    const bars = [{ label: "before", values: p.before.slice(p.query * q, p.query * q + q), colour: "#8c8c8c" },
                  { label: "after", values: p.after.slice(p.query * q, p.query * q + q), colour: "#c0392b" }];
    p.others.forEach((o, k) => bars.push({ label: "after: " + o.label, values: o.after.slice(p.query * q, p.query * q + q),
                                            colour: ["#2471a3", "#7d3c98"][k % 2] }));
    box.append(rowBars(p.tokens, p.query, p.subject, bars, seq));
    return box;
  }

  // ------------------------------------------------------------------ before / after view
  function patternsView(root, data, read) {
    root.append(el("h3", { text: data.title }));
    let includeFirst = false;
    const body = el("div");
    const toggle = el("label", { class: "ad-check" },
      el("input", { type: "checkbox", "data-role": "include-first", onchange: e => { includeFirst = e.target.checked; draw(); } }),
      " colour scale includes the first token");
    root.append(toggle, body);
    const q = data.tokens.length;
    const heads = data.heads.map(h => ({ label: h.label, before: square(read(h.before), q), after: h.after ? square(read(h.after), q) : null }));
    function draw() {
      body.textContent = "";
      for (const h of heads) {
        const sec = el("section", { class: "ad-head", "data-head-label": h.label });
        sec.append(el("h4", { text: h.label }));
        if (h.after) {
          sec.append(patternPanels({ tokens: data.tokens, query: data.query, subject: data.subject, before: h.before,
                                     after: h.after, others: [], labels: data.labels }, includeFirst));
        } else {
          const notFirst = i => includeFirst || i % q !== 0;
          const m = maxAbs(h.before, notFirst) || maxAbs(h.before) || 1;
          const scale = { signed: !!data.signed, max: m };
          sec.append(matrix({ key: "values", title: data.labels ? data.labels[0] : h.label, tokens: data.tokens, values: h.before,
                              scale: scale, query: data.query, subject: data.subject }));
          sec.append(legend(scale, data.signed ? "blue = attention lost after the edit, red = attention gained" +
            (includeFirst ? "" : "; scale leaves out the first token") : ""));
        }
        body.append(sec);
      }
    }
    draw();
  }

  // ------------------------------------------------------------------ explorer
  function decodeRun(run, read, L, H) {
    const n = run.prompts.length;
    const out = {
      label: run.label, meta: run.meta, records: run.records, prompts: run.prompts, top: run.top,
      failure: run.failure_rate, lp: read(run.lp), before: read(run.before), after: read(run.after),
      kl: read(run.kl), metrics: {}, match: run.match || null, n: n, patterns: run.patterns, cache: {},
      sadr: run.sadr ? { mean: read(run.sadr.mean), records: {} } : null,
    };
    for (const [k, ref] of Object.entries(run.metrics)) out.metrics[k] = read(ref);
    if (run.sadr) for (const [r, ref] of Object.entries(run.sadr.records)) out.sadr.records[r] = read(ref);
    out.drift = new Float32Array(n * L * H);
    for (let i = 0; i < out.drift.length; i++) out.drift[i] = out.after[i] - out.before[i];
    out.pattern = function (row, l, h) {
      const p = run.patterns[String(row)];
      if (!p || !p.heads[l + "," + h]) return null;
      const key = row + ":" + l + "," + h;
      if (!out.cache[key]) {
        const q = p.tokens.length, [b, a] = p.heads[l + "," + h];
        out.cache[key] = { tokens: p.tokens, query: p.q, subject: p.s, before: square(read(b), q), after: square(read(a), q) };
      }
      return out.cache[key];
    };
    out.storedHeads = row => Object.keys((run.patterns[String(row)] || { heads: {} }).heads).map(k => k.split(",").map(Number));
    return out;
  }

  function explorer(root, data, read) {
    const L = data.n_layers, H = data.n_heads, LH = L * H;
    const runs = data.runs.map(r => decodeRun(r, read, L, H));
    const A = runs[0], B = runs[1] || null;
    const cmpRow = p => (B ? B.match[p] : -1);
    const state = { metric: "mean_drift", view: "runs", layer: A.top[0][0], head: A.top[0][1], prompt: 0, includeFirst: false };
    state.prompt = bestPrompt(state.layer, state.head);

    function bestPrompt(l, h) {
      let best = -1, bestV = -Infinity, bestStored = -1, bestStoredV = -Infinity;
      for (let p = 0; p < A.n; p++) {
        const v = A.drift[p * LH + l * H + h];
        if (!fin(v)) continue;
        if (v > bestV) { bestV = v; best = p; }
        if (A.pattern(p, l, h) && v > bestStoredV) { bestStoredV = v; bestStored = p; }
      }
      return bestStored >= 0 ? bestStored : Math.max(best, 0);
    }
    function at(run, row, l, h, arr) { return row < 0 ? NaN : run[arr][row * LH + l * H + h]; }
    function meanOver(run, arr, l, h) {
      let s = 0, c = 0;
      for (let p = 0; p < run.n; p++) { const v = run[arr][p * LH + l * H + h]; if (fin(v)) { s += v; c++; } }
      return c ? s / c : NaN;
    }

    // ---- layout
    root.append(el("h2", { text: data.title }));
    const summary = el("div", { class: "ad-summary" });
    for (const run of runs) {
      const m = run.meta || {};
      const rates = Object.entries(run.failure || {}).map(([g, v]) => `${g.replace("distract_", "distract ")} ${fin(v) ? (100 * v).toFixed(1) + "%" : "–"}`).join(", ");
      summary.append(el("p", {}, el("b", { text: run.label }),
        ` · ${m.model || "model ?"} · ${run.records.length} records, ${run.n} distract prompts · failure rate (of the prompts right before the edit) ${rates}`));
    }
    root.append(summary);
    const main = el("div", { class: "ad-main" });
    const left = el("section", { class: "ad-left", "data-role": "heatmap-section" });
    const right = el("section", { class: "ad-right", "data-role": "head-panel" });
    main.append(left, right);
    root.append(main);

    const metricSelect = el("select", { "data-role": "metric", onchange: e => { state.metric = e.target.value; drawHeatmaps(); } });
    for (const m of data.metrics) metricSelect.append(el("option", { value: m.key, text: m.label.replace("the threshold", data.threshold) }));
    metricSelect.append(el("option", { value: "prompt", text: "drift on the selected prompt" }));
    const controls = el("div", { class: "ad-controls" }, el("label", {}, "heatmap: ", metricSelect));
    if (B) {
      const viewSelect = el("select", { "data-role": "view", onchange: e => { state.view = e.target.value; drawHeatmaps(); } });
      viewSelect.append(el("option", { value: "runs", text: "side by side" }));
      viewSelect.append(el("option", { value: "diff", text: `${B.label} − ${A.label}` }));
      controls.append(el("label", {}, "runs: ", viewSelect));
    }
    left.append(controls);
    const maps = el("div", { class: "ad-maps" });
    const mapLegend = el("div");
    left.append(maps, mapLegend);

    const promptsSec = el("section", { class: "ad-prompts", "data-role": "prompts" });
    const topSec = el("section", { class: "ad-top", "data-role": "top-heads" });
    const sadrSec = el("section", { class: "ad-sadr", "data-role": "sadr" });
    root.append(promptsSec, el("div", { class: "ad-row" }, topSec, sadrSec));

    // ---- heatmaps
    function metricValues(run, row) {
      if (state.metric !== "prompt") return run.metrics[state.metric];
      const out = new Float32Array(LH).fill(NaN);
      if (row >= 0) for (let i = 0; i < LH; i++) out[i] = run.drift[row * LH + i];
      return out;
    }
    function heatmapValues() {
      const a = metricValues(A, state.prompt);
      if (!B) return [{ run: 0, label: A.label, values: a }];
      const b = metricValues(B, cmpRow(state.prompt));
      if (state.view === "diff") return [{ run: "diff", label: `${B.label} − ${A.label}`, values: b.map((v, i) => v - a[i]) }];
      return [{ run: 0, label: A.label, values: a }, { run: 1, label: B.label, values: b }];
    }
    function sadrMarks(which) {
      const run = which === "diff" ? (B && B.sadr ? B : A.sadr ? A : null) : runs[which];
      if (!run || !run.sadr) return null;
      if (state.metric === "prompt") {
        const row = run === A ? state.prompt : cmpRow(state.prompt);
        const rec = row >= 0 ? run.prompts[row].r : -1;
        return run.sadr.records[String(rec)] || null;
      }
      return run.sadr.mean;
    }
    function drawHeatmaps() {
      maps.textContent = "";
      mapLegend.textContent = "";
      const panels = heatmapValues();
      const signed = state.metric === "mean_drift" || state.metric === "corr_fails" || state.metric === "prompt" || panels[0].run === "diff";
      let top = Math.max(...panels.map(p => (signed ? maxAbs(p.values) : Math.max(0, ...Array.from(p.values).filter(fin)))));
      if (!(top > 0)) top = 1;
      const scale = { signed: signed, max: top };
      let anySadr = false;
      for (const p of panels) {
        const marks = sadrMarks(p.run);
        anySadr = anySadr || !!marks;
        maps.append(heatmap(p, scale, marks));
      }
      const desc = state.metric === "prompt" ? `drift (after − before attention to the subject's last token) on prompt #${state.prompt}` :
        data.metrics.find(m => m.key === state.metric).description.replace("the threshold", "the threshold " + data.threshold);
      mapLegend.append(legend(scale, desc + (signed ? "; blue: negative, red: positive" : "")));
      if (anySadr) mapLegend.append(el("p", { class: "ad-note", text: "● heads SADR selected (dot size: fraction of steps" +
        (state.metric === "prompt" ? ", this prompt's record)" : ", mean over records)") }));
      mapLegend.append(el("p", { class: "ad-note", text: "Click a cell to show that head's attention on the selected prompt." }));
    }
    function heatmap(p, scale, marks) {
      const cw = 24, ch = 15, left = 36, top = 34;
      const W = left + H * cw + 6, Ht = top + L * ch + 6;
      const fig = el("figure", { class: "ad-heatmap", "data-run": String(p.run) });
      fig.append(el("figcaption", { text: p.label }));
      const svg = sv("svg", { width: W, height: Ht, viewBox: `0 0 ${W} ${Ht}` }, fig);
      const g = sv("g", { transform: `translate(${left},${top})` }, svg);
      sv("text", { x: (H * cw) / 2, y: -22, "text-anchor": "middle", "font-size": 11 }, g).textContent = "head";
      for (let h = 0; h < H; h++) sv("text", { x: h * cw + cw / 2, y: -6, "text-anchor": "middle", "font-size": 10 }, g).textContent = "H" + h;
      for (let l = 0; l < L; l++) sv("text", { x: -5, y: l * ch + ch / 2, "text-anchor": "end", "dominant-baseline": "central", "font-size": 10 }, g).textContent = "L" + l;
      for (let l = 0; l < L; l++) {
        for (let h = 0; h < H; h++) {
          const v = p.values[l * H + h];
          const r = sv("rect", { x: h * cw, y: l * ch, width: cw - 1, height: ch - 1, fill: colour(scale, v), class: "ad-cell",
                                 "data-layer": l, "data-head": h, "data-value": fin(v) ? v.toPrecision(6) : "nan",
                                 onclick: () => selectHead(l, h) }, g);
          tip(r, `layer ${l}, head ${h}: ${scale.signed ? sfmt(v, 4) : fmt(v, 4)}`);
          if (marks && marks[l * H + h] > 0) {
            sv("circle", { cx: h * cw + cw - 7, cy: l * ch + 5, r: 1.5 + 3 * Math.min(1, marks[l * H + h]), class: "ad-sadr-mark",
                           "data-sadr": `${l},${h}` }, g);
          }
        }
      }
      sv("rect", { x: state.head * cw - 1, y: state.layer * ch - 1, width: cw + 1, height: ch + 1, class: "ad-selected" }, g);
      return fig;
    }

    // ---- head panel
    function measuredLine(run, row) {
      const { layer: l, head: h } = state;
      if (row < 0) return el("li", {}, el("b", { text: run.label }), ": this prompt is not in the run");
      const b = at(run, row, l, h, "before"), a = at(run, row, l, h, "after"), k = at(run, row, l, h, "kl");
      return el("li", { "data-role": "measured" }, el("b", { text: run.label }),
        `: attention to the subject's last token ${fmt(b)} → ${fmt(a)} (drift ${sfmt(a - b)}); KL(before ‖ after) of the row ${fmt(k)}`);
    }
    function drawHead() {
      const { layer: l, head: h, prompt: p } = state;
      right.textContent = "";
      right.dataset.layer = l;
      right.dataset.head = h;
      right.dataset.prompt = p;
      const info = A.prompts[p], rec = A.records[info.r];
      right.append(el("h3", { "data-role": "head-title", text: `Layer ${l}, head ${h} (${headName(l, h)}) on prompt #${p}` }));
      right.append(el("p", { class: "ad-prompt-text" }, el("span", { class: "ad-muted", text: `record ${rec.case_id} · ${info.g} · ` }),
        info.p, el("span", { class: "ad-muted", text: ` → true: ${info.t}, new: ${rec.target_new}` })));
      right.append(el("ul", { class: "ad-measures" }, ...runs.map((run, k) => measuredLine(run, k === 0 ? p : cmpRow(p)))));
      const pat = A.pattern(p, l, h);
      if (!pat) {
        const stored = A.storedHeads(p);
        const msg = el("div", { class: "ad-missing", "data-role": "no-pattern" },
          el("p", { text: `No full attention pattern of ${headName(l, h)} is stored for this prompt; the values above are the measured ` +
            "prediction-row values (before / after the edit) from the run." }));
        if (stored.length) {
          msg.append(el("p", {}, "Heads with stored patterns on this prompt: ",
            ...stored.map(([sl, sh]) => el("button", { class: "ad-chip", text: headName(sl, sh), onclick: () => selectHead(sl, sh) }))));
        }
        const withHead = [];
        for (let r = 0; r < A.n && withHead.length < 12; r++) if (A.pattern(r, l, h)) withHead.push(r);
        if (withHead.length) {
          msg.append(el("p", {}, `Prompts with a stored pattern of ${headName(l, h)}: `,
            ...withHead.map(r => el("button", { class: "ad-chip", text: "#" + r, onclick: () => selectPrompt(r) }))));
        } else if (!stored.length) {
          msg.append(el("p", { text: "The run stored no full patterns for this prompt (run the drift with pattern capture to see them)." }));
        }
        right.append(msg);
        return;
      }
      const others = [];
      if (B) {
        const pb = cmpRow(p) >= 0 ? B.pattern(cmpRow(p), l, h) : null;
        if (pb) others.push({ label: B.label, after: pb.after });
      }
      right.append(el("label", { class: "ad-check" },
        el("input", { type: "checkbox", "data-role": "include-first", checked: state.includeFirst,
                      onchange: e => { state.includeFirst = e.target.checked; drawHead(); } }),
        " colour scale includes the first token"));
      right.append(patternPanels({ tokens: pat.tokens, query: pat.query, subject: pat.subject, before: pat.before,
                                   after: pat.after, others: others, labels: ["before the edit", "after: " + A.label] }, state.includeFirst));
    }

    // ---- prompts
    const filter = { text: "", failed: false };
    const table = el("table", { class: "ad-table", "data-role": "prompt-table" });
    const head = ["#", "record", "group", "prompt", "true / new", "P(true) before → after", "P(new) before → after", "fails"];
    if (B) head.push(`P(true) after: ${B.label}`, `P(new) after: ${B.label}`, `fails: ${B.label}`);
    head.push("drift of head");
    table.append(el("thead", {}, el("tr", {}, ...head.map(t => el("th", { text: t })))));
    const tbody = el("tbody");
    table.append(tbody);
    const lpOf = (run, row) => Array.from(run.lp.slice(row * 4, row * 4 + 4));
    const failText = (lp) => lp[3] > lp[2] ? (lp[1] > lp[0] ? "✗ fails (before too)" : "✗ fails") : "✓";
    const rows = [];
    for (let p = 0; p < A.n; p++) {
      const info = A.prompts[p], rec = A.records[info.r], lp = lpOf(A, p);
      const cells = [el("td", { text: p }), el("td", { text: rec.case_id }), el("td", { text: info.g.replace("distract_", "") }),
        el("td", { class: "ad-ptext", text: info.p, title: info.p }), el("td", { text: `${info.t} / ${rec.target_new}` }),
        el("td", { text: `${pfmt(lp[0])} → ${pfmt(lp[2])}` }), el("td", { text: `${pfmt(lp[1])} → ${pfmt(lp[3])}` }),
        el("td", { class: lp[3] > lp[2] ? "ad-fail" : "ad-ok", text: failText(lp) })];
      if (B) {
        const r = cmpRow(p);
        const lb = r >= 0 ? lpOf(B, r) : [NaN, NaN, NaN, NaN];
        cells.push(el("td", { text: pfmt(lb[2]) }), el("td", { text: pfmt(lb[3]) }),
                   el("td", { class: lb[3] > lb[2] ? "ad-fail" : "ad-ok", text: r >= 0 ? failText(lb) : "–" }));
      }
      const driftCell = el("td", { class: "ad-num" });
      cells.push(driftCell);
      const tr = el("tr", { "data-prompt": p, "data-fails": lp[3] > lp[2] ? "1" : "0", onclick: () => selectPrompt(p) }, ...cells);
      rows.push({ tr, driftCell, text: (info.p + " " + info.t + " " + rec.target_new + " " + rec.case_id).toLowerCase(), fails: lp[3] > lp[2] });
      tbody.append(tr);
    }
    function applyFilter() {
      for (const r of rows) r.tr.hidden = (filter.failed && !r.fails) || (filter.text && !r.text.includes(filter.text));
    }
    promptsSec.append(el("h3", { text: "Distract prompts" }),
      el("div", { class: "ad-controls" },
        el("input", { type: "search", placeholder: "filter prompts…", "data-role": "prompt-filter",
                      oninput: e => { filter.text = e.target.value.toLowerCase(); applyFilter(); } }),
        el("label", { class: "ad-check" }, el("input", { type: "checkbox", "data-role": "failed-only",
          onchange: e => { filter.failed = e.target.checked; applyFilter(); } }), " failed only"),
        el("span", { class: "ad-muted", text: " Click a row to show the selected head on that prompt. P = exp(mean per-token log-probability)." })),
      el("div", { class: "ad-scroll" }, table));
    function updatePrompts() {
      const { layer: l, head: h } = state;
      table.querySelector("th:last-child").textContent = `drift of ${headName(l, h)}`;
      rows.forEach((r, p) => {
        const parts = [sfmt(A.drift[p * LH + l * H + h])];
        if (B && cmpRow(p) >= 0) parts.push(sfmt(B.drift[cmpRow(p) * LH + l * H + h]));
        r.driftCell.textContent = parts.join(" | ") + (A.pattern(p, l, h) ? " ◆" : "");
        r.tr.classList.toggle("ad-selected-row", p === state.prompt);
      });
    }

    // ---- top heads and SADR
    function drawTop() {
      topSec.textContent = "";
      topSec.append(el("h3", { text: `Top ${A.top.length} drifting heads (${A.label}, by mean drift)` }));
      const cols = ["head", "attention before → after (mean)", "mean drift", `frac > ${data.threshold}`, "mean KL", "r(drift, fails)"];
      if (B) cols.push(`mean drift: ${B.label}`);
      const t = el("table", { class: "ad-table", "data-role": "top-table" }, el("thead", {}, el("tr", {}, ...cols.map(c => el("th", { text: c })))));
      const body = el("tbody");
      for (const [l, h] of A.top) {
        const i = l * H + h;
        const cells = [el("td", { text: headName(l, h) }), el("td", { text: `${fmt(meanOver(A, "before", l, h))} → ${fmt(meanOver(A, "after", l, h))}` }),
          el("td", { class: "ad-num", text: sfmt(A.metrics.mean_drift[i]) }), el("td", { class: "ad-num", text: fmt(A.metrics.frac_above[i], 2) }),
          el("td", { class: "ad-num", text: fmt(A.metrics.kl[i]) }), el("td", { class: "ad-num", text: sfmt(A.metrics.corr_fails[i], 2) })];
        if (B) cells.push(el("td", { class: "ad-num", text: sfmt(B.metrics.mean_drift[i]) }));
        body.append(el("tr", { "data-layer": l, "data-head": h, class: l === state.layer && h === state.head ? "ad-selected-row" : null,
                              onclick: () => selectHead(l, h) }, ...cells));
      }
      t.append(body);
      topSec.append(t);
    }
    function drawSadr() {
      sadrSec.textContent = "";
      const withSadr = runs.filter(r => r.sadr);
      if (!withSadr.length) {
        if (B) sadrSec.append(el("h3", { text: "SADR" }), el("p", { class: "ad-muted", text: "Neither run recorded which heads SADR selected; compare the runs' drift with the heatmap's runs switch." }));
        return;
      }
      for (const run of withSadr) {
        const order = Array.from(run.sadr.mean.keys()).filter(i => run.sadr.mean[i] > 0).sort((x, y) => run.sadr.mean[y] - run.sadr.mean[x]).slice(0, 15);
        const nrec = Object.keys(run.sadr.records).length;
        sadrSec.append(el("h3", { text: `Heads SADR selected (${run.label})` }),
          el("p", { class: "ad-muted", text: `Fraction of optimisation steps × regularised prompts in which SADR restricted the head, mean over ${nrec} records; drift of each run side by side.` }));
        const cols = ["head", "selected", ...runs.map(r => `mean drift: ${r.label}`)];
        const t = el("table", { class: "ad-table", "data-role": "sadr-table" }, el("thead", {}, el("tr", {}, ...cols.map(c => el("th", { text: c })))));
        const body = el("tbody");
        for (const i of order) {
          const l = Math.floor(i / H), h = i % H;
          body.append(el("tr", { "data-layer": l, "data-head": h, onclick: () => selectHead(l, h) },
            el("td", { text: headName(l, h) }), el("td", { class: "ad-num", text: fmt(run.sadr.mean[i], 2) }),
            ...runs.map(r => el("td", { class: "ad-num", text: sfmt(r.metrics.mean_drift[i]) }))));
        }
        if (!order.length) body.append(el("tr", {}, el("td", { colspan: cols.length, text: "SADR selected no head." })));
        t.append(body);
        sadrSec.append(t);
      }
    }

    function selectHead(l, h) {
      state.layer = l;
      state.head = h;
      drawHeatmaps();
      drawHead();
      updatePrompts();
      drawTop();
    }
    function selectPrompt(p) {
      state.prompt = p;
      if (state.metric === "prompt") drawHeatmaps();
      drawHead();
      updatePrompts();
    }
    drawHeatmaps();
    drawHead();
    updatePrompts();
    drawTop();
    drawSadr();
  }

  /* Draw the view whose <div> has id ``id`` (retried for a moment when a notebook front end
     runs the script before the output is attached to the document). */
  async function start(id, tries) {
    const root = document.getElementById(id);
    if (!root) {
      if ((tries || 0) < 200) setTimeout(() => start(id, (tries || 0) + 1), 25);
      return;
    }
    try {
      const data = JSON.parse(document.getElementById(id + "-data").textContent);
      let bytes = b64(document.getElementById(id + "-blob").textContent);
      if (data.blob && data.blob.deflate) bytes = await inflate(bytes);
      const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
      root.textContent = "";
      (root.dataset.kind === "patterns" ? patternsView : explorer)(root, data, reader(buffer));
      root.dataset.ready = "1";
    } catch (err) {
      root.textContent = "";
      root.append(el("p", { class: "ad-error", text: "This view could not be drawn: " + err.message }));
      root.dataset.error = err.message;
      console.error(err);
    }
  }
  window.ADExplorer = { start: start };
})();
