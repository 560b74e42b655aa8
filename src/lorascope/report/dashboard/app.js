/* lorascope feature dashboard. Vanilla JS, no network: the data is in #meta (JSON) and #bulk
   (base64 of a gzip of typed arrays, decoded locally with DecompressionStream). Every piece of data
   reaches the page through textContent, title or dataset, never through HTML parsing. */
"use strict";
(function () {
  const PAGE = 200;
  const KIND_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mlp"];
  const TYPES = {
    u8: Uint8Array, i8: Int8Array, u16: Uint16Array, i16: Int16Array,
    u32: Uint32Array, i32: Int32Array, f32: Float32Array,
  };
  const $ = (id) => document.getElementById(id);

  /* An element with text content only: data never goes through innerHTML. */
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const SVG = "http://www.w3.org/2000/svg";  // a namespace name, not a request
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    return e;
  }

  // ------------------------------------------------------------------------------ metadata
  /* Feature objects from the columns of #meta: a 0/1 column `k` with columns `k.sub` is a nested object. */
  function rowsOf(table) {
    const rows = Array.from({ length: table.n }, () => ({}));
    const names = Object.keys(table.columns);
    for (const name of names) {
      if (name.includes(".")) continue;
      const nested = names.some((c) => c.startsWith(name + "."));
      table.columns[name].forEach((v, i) => { rows[i][name] = nested ? (v ? {} : null) : v; });
    }
    for (const name of names) {
      const dot = name.indexOf(".");
      if (dot < 0) continue;
      const k = name.slice(0, dot), sub = name.slice(dot + 1);
      table.columns[name].forEach((v, i) => { if (rows[i][k]) rows[i][k][sub] = v; });
    }
    return rows;
  }
  const meta = JSON.parse($("meta").textContent);
  const features = rowsOf(meta.features);
  const byKey = new Map();
  const classes = meta.classes || {};
  features.forEach((f, i) => {
    f.index = i;
    f.key = f.source + "/" + f.name;
    f.hay = [f.name, f.explanation || "", ...(f.top || [])].join("\n").toLowerCase();
    byKey.set(f.key, f);
  });

  // ------------------------------------------------------------------------------ bulk arrays
  let bulk = null;
  async function decodeBulk() {
    const node = $("bulk");
    const text = node.textContent.trim();
    node.textContent = "";
    let bytes;
    if (typeof Uint8Array.fromBase64 === "function") {
      bytes = Uint8Array.fromBase64(text);
    } else {
      const bin = atob(text);
      bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    const buf = await new Response(stream).arrayBuffer();
    const b = {};
    for (const [name, [offset, count, type]] of Object.entries(meta.bulk.sections)) {
      b[name] = new TYPES[type](buf, offset, count);
    }
    b.vocab = new TextDecoder().decode(b.vocab_utf8);
    b.vocabStart = prefix(b.vocab_len);
    b.ctxStart = prefix(b.ctx_len);
    b.segStart = prefix(b.seg_len);
    b.ctxTok = leb128(b.ctx_ids, meta.bulk.tokens);
    b.segTok = leb128(b.seg_ids, meta.bulk.segment_tokens);
    return b;
  }
  function prefix(lengths) {
    const out = new Float64Array(lengths.length + 1);
    for (let i = 0; i < lengths.length; i++) out[i + 1] = out[i] + lengths[i];
    return out;
  }
  /* `count` unsigned LEB128 numbers. */
  function leb128(bytes, count) {
    const out = new Uint32Array(count);
    let i = 0;
    for (let j = 0; j < count; j++) {
      let b = bytes[i++], v = b & 127, shift = 7;
      while (b & 128) {
        b = bytes[i++];
        v += (b & 127) * 2 ** shift;
        shift += 7;
      }
      out[j] = v;
    }
    return out;
  }
  function tokenText(id) {
    return bulk.vocab.substring(bulk.vocabStart[id], bulk.vocabStart[id + 1]);
  }

  const ready = decodeBulk().then((b) => {
    bulk = b;
    document.body.dataset.bulkAt = String(performance.now());
    document.body.dataset.bulk = "ready";
    return b;
  });
  ready.catch((err) => {
    document.body.dataset.bulk = "failed";
    $("detail").replaceChildren(el("p", "error", "Could not decode the embedded data: " + err));
    console.error(err);
  });

  // ------------------------------------------------------------------------------ formatting
  const fmt = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));
  function exact(x) {
    return Number(Number(x).toPrecision(5)).toString();
  }
  /* Decimals that show a value quantised with step scale / 127. */
  function decimals(scale) {
    if (!(scale > 0)) return 2;
    return Math.max(0, Math.min(10, Math.ceil(-Math.log10(scale / 127))));
  }
  function className(f) {
    if (f.class === null || f.class === undefined) return f.status === "ok" ? "unclassified" : "not labelled";
    return f.class + " " + (classes[String(f.class)] || "");
  }
  function shade(q) {
    const a = (0.12 + 0.88 * Math.abs(q) / 127).toFixed(3);
    return q > 0 ? `rgba(220, 38, 38, ${a})` : `rgba(37, 99, 235, ${a})`;
  }
  function visibleContext(t) {
    return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "");
  }
  function visibleSample(t) {
    return t.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u21e5").replace(/\r/g, "");
  }
  /* One token: highlighted when its quantised activation is nonzero; the value in its title. */
  function tokSpan(text, shown, q, value, isPeak) {
    const s = el("span", "tok" + (q !== 0 ? " hl" : "") + (isPeak ? " peak" : ""), shown);
    s.title = "act " + value + "  " + JSON.stringify(text);
    if (q !== 0) s.style.backgroundColor = shade(q);
    return s;
  }

  // ------------------------------------------------------------------------------ filters and list
  const controls = {
    source: $("f-source"), cls: $("f-class"), category: $("f-category"),
    layer: $("f-layer"), component: $("f-component"), sort: $("f-sort"),
  };
  function addOptions(select, values, label) {
    for (const v of values) {
      const o = el("option", null, label ? label(v) : v);
      o.value = v;
      select.append(o);
    }
  }
  function distinct(fn) {
    const set = new Set();
    for (const f of features) {
      const v = fn(f);
      if (v !== null && v !== undefined) set.add(String(v));
    }
    return [...set];
  }
  addOptions(controls.source, (meta.sources || []).map((s) => s.name));
  addOptions(controls.cls, distinct((f) => f.class).sort(), (v) => v + " " + (classes[v] || ""));
  if (features.some((f) => f.class === null || f.class === undefined)) addOptions(controls.cls, ["none"], () => "not labelled");
  addOptions(controls.category, distinct((f) => f.category).sort());
  addOptions(controls.layer, distinct((f) => f.layer).sort((a, b) => a - b), (v) => "L" + v);
  const order = (k) => (KIND_ORDER.indexOf(k) < 0 ? 99 : KIND_ORDER.indexOf(k));
  addOptions(controls.component, distinct((f) => f.component).sort((a, b) => order(a) - order(b) || (a < b ? -1 : 1)));

  let shown = [];
  let limit = PAGE;
  let current = null;

  function applyFilters() {
    const terms = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
    const src = controls.source.value, cls = controls.cls.value, cat = controls.category.value;
    const layer = controls.layer.value, comp = controls.component.value;
    shown = features.filter((f) =>
      (!src || f.source === src) &&
      (!cls || (cls === "none" ? f.class === null || f.class === undefined : String(f.class) === cls)) &&
      (!cat || f.category === cat) &&
      (!layer || String(f.layer) === layer) &&
      (!comp || f.component === comp) &&
      terms.every((t) => f.hay.includes(t)));
    const sort = controls.sort.value;
    if (sort !== "id") {
      const key = { detection: (f) => f.detection, max: (f) => f.max, density: (f) => f.density }[sort];
      shown = shown.slice().sort((a, b) => (key(b) ?? -Infinity) - (key(a) ?? -Infinity) || a.index - b.index);
    }
    limit = PAGE;
    renderList();
  }
  function row(f) {
    const li = el("li", "feature-row" + (f.key === current ? " selected" : ""));
    li.dataset.key = f.key;
    li.tabIndex = 0;
    li.append(
      el("span", "fname", f.name),
      el("span", "badge", f.source),
      el("span", "badge", f.class === null || f.class === undefined ? "—" : "class " + f.class),
      f.category ? el("span", "badge", f.category) : el("span"),
      el("span", "fexpl", f.explanation ?? "(no explanation)"),
    );
    return li;
  }
  function renderList() {
    $("feature-list").replaceChildren(...shown.slice(0, limit).map(row));
    const count = $("count");
    count.textContent = `${shown.length} of ${features.length} features`;
    count.dataset.count = String(shown.length);
    const more = $("more"), hidden = shown.length - limit;
    more.hidden = hidden <= 0;
    more.textContent = `Show ${Math.min(PAGE, hidden)} more (${hidden} not shown)`;
  }
  $("more").addEventListener("click", () => {
    const list = $("feature-list");
    list.append(...shown.slice(limit, limit + PAGE).map(row));
    limit += PAGE;
    const hidden = shown.length - limit;
    $("more").hidden = hidden <= 0;
    $("more").textContent = `Show ${Math.min(PAGE, hidden)} more (${hidden} not shown)`;
  });
  $("search").addEventListener("input", applyFilters);
  for (const c of Object.values(controls)) c.addEventListener("change", applyFilters);

  function pick(target) {
    const li = target.closest(".feature-row");
    if (!li) return;
    const hash = "#" + encodeURIComponent(li.dataset.key);
    if (location.hash === hash) show(li.dataset.key);
    else location.hash = hash;  // same-document navigation: no request
  }
  $("feature-list").addEventListener("click", (e) => pick(e.target));
  $("feature-list").addEventListener("keydown", (e) => {
    if (e.key === "Enter") pick(e.target);
  });
  function fromHash() {
    try {
      return decodeURIComponent(location.hash.slice(1));
    } catch (err) {
      return "";
    }
  }
  window.addEventListener("hashchange", () => show(fromHash()));

  // ------------------------------------------------------------------------------ detail
  let generation = 0;
  async function show(key) {
    const f = byKey.get(key);
    if (!f) return;
    current = key;
    for (const li of document.querySelectorAll(".feature-row")) li.classList.toggle("selected", li.dataset.key === key);
    const detail = $("detail");
    const mine = ++generation;
    if (!bulk) {
      detail.replaceChildren(el("p", "placeholder", "Decoding the embedded data\u2026"));
      try {
        await ready;
      } catch (err) {
        return;
      }
      if (mine !== generation) return;
    }
    detail.replaceChildren(...detailOf(f));
    detail.dataset.feature = key;
    detail.dataset.renderedAt = String(performance.now());
    detail.scrollTop = 0;
    const peak = document.getElementById("sample-peak");
    if (peak) {
      const box = $("sample");
      box.scrollTop = Math.max(0, peak.offsetTop - box.offsetTop - box.clientHeight / 2);
    }
  }

  function detailOf(f) {
    const out = [];
    const title = el("h2", null, f.name);
    out.push(title);
    const expl = el("p", null, f.explanation ?? `(no explanation: labelling ${f.status || "missing"}${f.error ? ": " + f.error : ""})`);
    expl.id = "d-explanation";
    out.push(expl);
    const facts = el("dl", "facts");
    const fact = (k, v) => facts.append(el("dt", null, k), el("dd", null, v));
    fact("source", `${f.source} (feature ${f.id}${f.sign < 0 ? ", negative sign" : f.source === "lora" ? ", positive sign" : ""})`);
    fact("class", className(f));
    fact("category", f.category ? f.category + (f.subcategory ? " / " + f.subcategory : "") : "—");
    fact("layer", f.layer === null || f.layer === undefined ? "all (SAE latent)" : String(f.layer));
    fact("component", f.component || (f.source === "sae" ? "all (see the decoder heatmap)" : "—"));
    fact("detection", f.detection === null || f.detection === undefined ? "—" : `${fmt(f.detection)} balanced accuracy (${f.detection_n} windows)`);
    fact("max activation", f.max === null || f.max === undefined ? "—" : exact(f.max));
    fact("density", f.density === null || f.density === undefined ? "—" : `${(100 * f.density).toPrecision(3)}% of tokens`);
    if (f.top && f.top.length) fact("top tokens", f.top.map((t) => JSON.stringify(t)).join("  "));
    if (f.attr) {
      const a = f.attr;
      fact("attribution", `screen rank ${a.rank} of ${a.units} (ΔCE ${fmt(a.screened)} nats/token)` +
        (a.delta_ce === null ? "" : `; exact ΔCE ${fmt(a.delta_ce)}, KL ${fmt(a.kl)}`) +
        (a.delta_accuracy === null ? "" : `; Δaccuracy ${fmt(a.delta_accuracy)}` +
          (a.ci ? ` (95% CI ${fmt(a.ci[0])} to ${fmt(a.ci[1])})` : "")));
    }
    out.push(facts);
    const legend = el("p", "legend");
    legend.append(el("span", "swatch pos"), " positive  ", el("span", "swatch neg"), " negative activation; intensity relative to the feature's largest |activation|; hover a token for its value");
    if (f.hist) out.push(el("h3", null, "Activation histogram"), histogram(f));
    if (f.heat !== null && f.heat !== undefined && meta.heatmap) out.push(el("h3", null, "Decoder vector (layer \u00d7 component type)"), heatmap(f));
    out.push(el("h3", null, `Top ${f.ctx[1]} contexts`), legend, contexts(f));
    if (f.sample) out.push(el("h3", null, "Training sample"), ...sample(f));
    else if (f.hist) out.push(el("h3", null, "Training sample"), el("p", "placeholder", `Not active in the first ${f.hist.tokens.toLocaleString()} tokens of the store.`));
    return out;
  }

  function histogram(f) {
    const h = f.hist, n = h.counts.length, W = 360, H = 90;
    const box = el("div", "hist");
    const top = Math.max(1, ...h.counts);
    const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
    const step = (h.hi - h.lo) / n;
    h.counts.forEach((c, i) => {
      const a = h.lo + i * step, b = a + step, mid = (a + b) / 2;
      const height = c ? Math.max(1, (c / top) * H) : 0;
      const on = mid * f.sign > 0;
      const r = svg("rect", {
        x: (i * W) / n, y: H - height, width: Math.max(1, W / n - 1), height,
        fill: on ? (f.sign > 0 ? "rgb(220, 38, 38)" : "rgb(37, 99, 235)") : "#8c959f",
      });
      const t = document.createElementNS(SVG, "title");
      t.textContent = `[${exact(a)}, ${exact(b)}): ${c} tokens`;
      r.append(t);
      chart.append(r);
    });
    const axis = el("div", "axis");
    axis.append(el("span", null, exact(h.lo)), el("span", null, exact(h.hi)));
    const nonzero = h.tokens - h.zeros;
    const cap = el("p", "caption",
      `${h.tokens.toLocaleString()} tokens from the start of the store; ${nonzero.toLocaleString()} nonzero` +
      (h.zeros ? ` (${h.zeros.toLocaleString()} exactly zero, not binned)` : "") + "; bars on the feature's side coloured");
    box.append(chart, axis, cap);
    return box;
  }

  function heatmap(f) {
    const g = meta.heatmap, L = g.layers.length, K = g.kinds.length;
    const q = bulk.heat_q.subarray(f.heat * L * K, (f.heat + 1) * L * K);
    const d = decimals(f.hs);
    const table = el("table");
    table.id = "heatmap";
    const head = el("thead"), hr = el("tr");
    hr.append(el("th"));
    for (const layer of g.layers) hr.append(el("th", null, "L" + layer));
    head.append(hr);
    const body = el("tbody");
    g.kinds.forEach((kind, k) => {
      const tr = el("tr");
      tr.append(el("th", null, kind));
      g.layers.forEach((layer, l) => {
        const v = q[l * K + k];
        const td = el("td", "cell" + (v === -128 ? " absent" : ""));
        if (v === -128) td.title = `L${layer}.${kind}: not adapted`;
        else {
          td.title = `L${layer}.${kind}: ${(v * f.hs / 127).toFixed(d)}`;
          if (v !== 0) td.style.backgroundColor = shade(v);
        }
        tr.append(td);
      });
      body.append(tr);
    });
    table.append(head, body);
    return table;
  }

  function contexts(f) {
    const box = el("div", "contexts");
    const [first, count] = f.ctx;
    const d = decimals(f.cs);
    for (let c = first; c < first + count; c++) {
      const start = bulk.ctxStart[c], n = bulk.ctx_len[c], peak = bulk.ctx_peak[c];
      const ids = bulk.ctxTok.subarray(start, start + n);
      const line = el("div", "ctx");
      line.append(el("span", "ctx-meta", `#${c - first}  ${exact(bulk.ctx_act[c])}  doc ${bulk.ctx_doc[c]} @${bulk.ctx_pos[c]}`));
      const text = el("span", "ctx-text");
      for (let i = 0; i < n; i++) {
        const t = tokenText(ids[i]), q = bulk.ctx_q[start + i];
        const value = i === peak ? exact(bulk.ctx_act[c]) : (q * f.cs / 127).toFixed(d);
        text.append(tokSpan(t, visibleContext(t), q, value, i === peak));
      }
      line.append(text);
      box.append(line);
    }
    if (!count) box.append(el("p", "placeholder", "No activating contexts."));
    return box;
  }

  function sample(f) {
    const s = f.sample, d = decimals(f.ss);
    const start = bulk.segStart[s.seg] + s.off;
    const ids = bulk.segTok.subarray(start, start + s.len);
    const info = el("p", "legend",
      `Document ${s.doc_id} (index ${s.doc}), tokens ${s.pos}\u2013${s.pos + s.len - 1}; ` +
      `strongest activation ${exact(s.act)} (outlined). Every token shows this feature's activation.`);
    const box = el("div", "sample");
    box.id = "sample";
    for (let i = 0; i < s.len; i++) {
      const t = tokenText(ids[i]), q = bulk.sample_q[s.a + i];
      const span = tokSpan(t, visibleSample(t), q, i === s.peak ? exact(s.act) : (q * f.ss / 127).toFixed(d), i === s.peak);
      if (i === s.peak) span.id = "sample-peak";
      box.append(span);
    }
    return [info, box];
  }

  // ------------------------------------------------------------------------------ start
  const counts = (meta.sources || [])
    .map((s) => `${s.name} ${s.features}` + (s.live_latents != null ? ` of ${s.live_latents} live latents` : ""))
    .join(", ");
  $("summary").textContent = `${features.length} features` + (counts ? ` (${counts})` : "");
  const missing = $("missing");
  for (const m of meta.missing || []) missing.append(el("li", null, m));
  missing.hidden = !(meta.missing || []).length;
  applyFilters();
  document.body.dataset.listAt = String(performance.now());
  document.body.dataset.list = "ready";
  if (location.hash.length > 1) show(fromHash());
})();
