// The search page: plain JS, no build step, nothing from the internet.
// The search lives in the page's URL (?id=N | ?url=URL | ?q=TOKEN, with k, min, f): reload, share,
// back and forward all work. Every piece of data is put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the last response shown

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function isHttp(url) {
  try { const u = new URL(url); return u.protocol === "http:" || u.protocol === "https:"; } catch (e) { return false; }
}

function linkOrText(url) {
  return isHttp(url) ? el("a", {href: url, rel: "noopener noreferrer nofollow", target: "_blank", text: url})
                     : el("span", {class: "path", text: url || ""});
}

// ------------------------------------------------------------------ state <-> URL

function readState() {
  const p = new URLSearchParams(location.search);
  const min = parseFloat(p.get("min"));
  return {
    id: p.get("id"), url: p.get("url"), q: p.get("q"),
    k: parseInt(p.get("k"), 10) || 20,
    min: Number.isFinite(min) ? Math.min(1, Math.max(-1, min)) : -1,  // -1: no minimum
    filters: p.getAll("f").filter(Boolean),
  };
}

function stateUrl(s) {
  const p = new URLSearchParams();
  for (const key of ["id", "url", "q"]) if (s[key]) p.set(key, s[key]);
  if (s.k !== 20) p.set("k", String(s.k));
  if (s.min > -1) p.set("min", s.min.toFixed(2));
  for (const f of s.filters) p.append("f", f);
  const qs = p.toString();
  return location.pathname + (qs ? "?" + qs : "");
}

function apiParams(s) {
  const p = new URLSearchParams();
  p.set("k", String(s.k));
  for (const f of s.filters) p.append("filter", f);
  return p;
}

function syncControls(s) {
  const k = $("k");
  if (![...k.options].some((o) => o.value === String(s.k))) k.append(el("option", {text: String(s.k)}));
  k.value = String(s.k);
  $("min").value = String(s.min);
  $("minval").textContent = minText(s.min);
  $("filters").value = s.filters.join(", ");
  $("url").value = s.url || "";
  $("idinput").value = s.id || "";
}

// ------------------------------------------------------------------ talking to the API

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function callApi(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the server did not answer (" + e.message + ")");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
  return body;
}

async function run(s) {
  syncControls(s);
  showError("");
  $("jsonlink").hidden = true;
  if (!s.id && !s.url && !s.q) {
    $("grid").replaceChildren();
    $("query").hidden = true;
    $("status").textContent = "Search by dropping, pasting or choosing an image, by its URL, or by an image id.";
    return;
  }
  const p = apiParams(s);
  if (s.id) p.set("id", s.id); else if (s.url) p.set("url", s.url); else p.set("q", s.q);
  $("status").textContent = "Searching…";
  try {
    render(await callApi("/api/search?" + p.toString()), s);
  } catch (e) {
    $("status").textContent = "";
    $("grid").replaceChildren();
    showError(e.message);
  }
}

function navigate(s, push) {
  const url = stateUrl(s);
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  return run(s);
}

async function upload(file) {
  if (!file) return;
  const s = readState();
  const form = new FormData();
  form.append("image", file, file.name || "pasted image");
  showError("");
  $("status").textContent = "Searching with " + (file.name || "the pasted image") + "…";
  try {
    const data = await callApi("/api/search?" + apiParams(s).toString(), {method: "POST", body: form});
    const next = {...s, id: null, url: null, q: data.query.token};
    history.pushState(null, "", stateUrl(next));
    syncControls(next);
    render(data, next);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

// ------------------------------------------------------------------ rendering

function metaText(meta) {
  if (!meta) return "";
  return Object.entries(meta).map(([k, v]) => k + ": " + v).join("\n");
}

function render(data, s) {
  current = data;
  const q = data.query;
  const p = apiParams(s);
  if (q.kind === "id") p.set("id", String(q.id)); else p.set("q", q.token);
  $("jsonlink").href = "/api/search?" + p.toString();
  $("jsonlink").hidden = false;
  if (q.thumbnail) {
    $("queryimg").src = q.thumbnail;
    $("querylabel").textContent = q.kind === "url" ? "query: " + q.url : "query: " + (q.name || "uploaded image");
    $("query").hidden = false;
  } else if (q.kind === "id") {
    $("queryimg").src = "/api/images/" + q.id + "/thumbnail";
    $("querylabel").textContent = "more like image #" + q.id;
    $("query").hidden = false;
  }
  const tiles = data.results.map((r) => {
    const more = el("button", {class: "more", type: "button", text: "More like this", "data-id": String(r.id)});
    more.addEventListener("click", () => navigate({...readState(), id: String(r.id), url: null, q: null}, true));
    const pic = el("button", {class: "pic", type: "button", title: "details"},
                   el("img", {src: r.thumbnail, alt: "image " + r.id, loading: r.rank > 50 ? "lazy" : "eager"}));
    pic.addEventListener("click", () => openDetail(r.id));
    const tile = el("figure", {class: "tile", "data-id": String(r.id), "data-score": String(r.score)},
      pic,
      el("div", {class: "meta", text: [r.url, metaText(r.meta)].filter(Boolean).join("\n")}),
      el("figcaption", {}, el("span", {class: "score", text: r.score.toFixed(4)}),
                           el("span", {class: "rank", text: "#" + r.rank}), more));
    tile.title = [r.url, metaText(r.meta)].filter(Boolean).join("\n");
    return tile;
  });
  $("grid").replaceChildren(...tiles);
  applyMin(s.min);
}

function minText(min) { return min <= -1 ? "any" : min.toFixed(2); }

function applyMin(min) {
  let shown = 0;
  const tiles = document.querySelectorAll("#grid .tile");
  for (const tile of tiles) {
    const hide = min > -1 && parseFloat(tile.dataset.score) < min;
    tile.classList.toggle("hidden", hide);
    if (!hide) shown += 1;
  }
  if (current) {
    const secs = current.seconds != null ? " in " + current.seconds.toFixed(3) + " s" : "";
    $("status").textContent = shown + " of " + tiles.length + " results shown" +
      (min > -1 ? " (score ≥ " + min.toFixed(2) + ")" : "") + secs;
  }
}

async function openDetail(id) {
  const body = $("detailbody");
  body.replaceChildren(el("p", {text: "Loading…"}));
  const dialog = $("detail");
  if (!dialog.open) dialog.showModal();
  try {
    const d = await callApi("/api/images/" + encodeURIComponent(id));
    const rows = [["id", String(d.id)], ["status", d.status], ["size", d.width && d.height ? d.width + " × " + d.height : ""],
                  ["format", d.format || ""], ["bytes", d.bytes != null ? String(d.bytes) : ""]];
    if (d.error) rows.push(["error", d.error]);
    for (const [k, v] of Object.entries(d.meta || {})) rows.push([k, v == null ? "" : String(v)]);
    const table = el("table", {class: "metadata"},
      el("tbody", {}, el("tr", {}, el("th", {text: "url"}), el("td", {}, linkOrText(d.url))),
        ...rows.map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {text: v})))));
    const more = el("button", {type: "button", class: "more", text: "More like this"});
    more.addEventListener("click", () => { dialog.close(); navigate({...readState(), id: String(d.id), url: null, q: null}, true); });
    const parts = [];
    if (d.original) parts.push(el("img", {class: "original", src: d.original, alt: "original of image " + d.id}));
    parts.push(more, table);
    if (d.original) parts.push(el("p", {}, el("a", {href: d.original, target: "_blank", text: "open the original"})));
    if (d.duplicates.length) {
      parts.push(el("h2", {text: "Duplicates (the same bytes at other URLs)"}));
      parts.push(el("ul", {class: "duplicates"}, ...d.duplicates.map((x) => el("li", {}, "#" + x.id + " ", linkOrText(x.url)))));
    }
    body.replaceChildren(...parts);
  } catch (e) {
    body.replaceChildren(el("p", {class: "error", text: e.message}));
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("file").addEventListener("change", (e) => { upload(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) drop.classList.remove("over"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = [...(e.dataTransfer.files || [])][0];
    if (file) { upload(file); return; }
    const text = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
    if (text && isHttp(text.trim())) navigate({...readState(), id: null, q: null, url: text.trim()}, true);
  });
  document.addEventListener("paste", (e) => {
    const items = [...(e.clipboardData ? e.clipboardData.items : [])];
    const image = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (image) { e.preventDefault(); upload(image.getAsFile()); return; }
    const inField = e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA");
    const text = e.clipboardData ? e.clipboardData.getData("text/plain").trim() : "";
    if (!inField && isHttp(text)) { e.preventDefault(); navigate({...readState(), id: null, q: null, url: text}, true); }
  });
  $("urlform").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("url").value.trim();
    if (url) navigate({...readState(), id: null, q: null, url}, true);
  });
  $("idform").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("idinput").value.trim();
    if (id) navigate({...readState(), url: null, q: null, id}, true);
  });
  $("k").addEventListener("change", () => navigate({...readState(), k: parseInt($("k").value, 10)}, true));
  $("min").addEventListener("input", () => {
    const min = parseFloat($("min").value);
    $("minval").textContent = minText(min);
    applyMin(min);
  });
  $("min").addEventListener("change", () => {
    const s = {...readState(), min: parseFloat($("min").value)};
    history.replaceState(null, "", stateUrl(s));
  });
  $("filterform").addEventListener("submit", (e) => {
    e.preventDefault();
    const filters = $("filters").value.split(",").map((f) => f.trim()).filter(Boolean);
    navigate({...readState(), filters}, true);
  });
  window.addEventListener("popstate", () => { const d = $("detail"); if (d.open) d.close(); run(readState()); });
  run(readState());
}

wire();
