// The coalign search page: plain JavaScript, no build step. Talks to the JSON API of coalign.serve.app.
// Every server string goes into the page through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "coalign-token";
const state = { token: "", items: null, seq: 0, objectUrls: [] };

// A token may arrive as ?token=...: keep it for this tab and take it out of the address bar
// so that it does not end up in bookmarks or shared links.
(function readToken() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY) || "";
})();

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 401) $("token-row").hidden = false;
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    const detail = body && body.detail != null ? describe(body.detail) : "";
    throw new Error(detail ? `${message}: ${detail}` : message);
  }
  return body;
}

// The API's error details, in words: {"limit": "max_k", "max_k": 100, "got": 500} -> "max_k is 100, got 500".
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("; ");
  }
  if (detail && typeof detail === "object") {
    const show = (v) => (Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : String(v));
    if (detail.limit) {
      const got = detail.got != null ? `, got ${detail.got}` : "";
      return `${detail.limit} is ${show(detail[detail.limit])}${got}`;
    }
    return Object.entries(detail).map(([k, v]) => `${k}: ${show(v)}`).join(", ");
  }
  return JSON.stringify(detail);
}

function showError(err) {
  $("error").textContent = err ? String(err.message || err) : "";
  $("error").hidden = !err;
}

function setStatus(extra) {
  const parts = [];
  if (state.items != null) parts.push(`${state.items.toLocaleString()} items`);
  if (extra) parts.push(extra);
  $("status").textContent = parts.join(" · ") || "ready";
}

async function loadHealth() {
  try {
    const health = await api("/health");
    state.items = health.items;
    const select = $("modality");
    select.replaceChildren();
    for (const m of health.modalities) {
      const option = document.createElement("option");
      option.value = option.textContent = m;
      if (m === "image") option.selected = true;
      select.appendChild(option);
    }
    if (health.auth && !state.token) $("token-row").hidden = false;
    setStatus(`searching ${health.modalities.join(", ")}`);
  } catch (err) {
    $("status").textContent = "server unreachable";
    showError(err);
  }
}

function releaseThumbnails() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
}

// <img src> cannot send an Authorization header, so with a token the thumbnail is fetched and shown as a blob.
async function setThumbnail(img, url) {
  if (!state.token) {
    img.src = url;
    return;
  }
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) throw new Error(String(response.status));
    const objectUrl = URL.createObjectURL(await response.blob());
    state.objectUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (_) {
    markMissing(img);
  }
}

function markMissing(img) {
  // An empty grey square reads better than the browser's broken-image icon.
  img.removeAttribute("src");
  img.alt = "";
  img.classList.add("missing");
}

function card(result, rank) {
  const el = document.createElement("article");
  el.className = "result";
  el.tabIndex = 0;
  el.dataset.id = result.id;
  el.dataset.rank = String(rank);
  el.title = `Search for items like ${result.id}`;

  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = result.caption || result.id;
  img.loading = "lazy";
  img.addEventListener("error", () => markMissing(img));
  if (result.thumbnail) setThumbnail(img, result.thumbnail);

  const body = document.createElement("div");
  body.className = "body";
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = result.caption || "(no caption)";
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score.toFixed(3);
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = result.id;
  meta.append(score, id);
  body.append(caption, meta);
  el.append(img, body);

  const open = () => run({ id: result.id }, `items like “${result.caption || result.id}”`);
  el.addEventListener("click", open);
  el.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      open();
    }
  });
  return el;
}

function render(response, label) {
  releaseThumbnails();
  const grid = $("results");
  grid.replaceChildren(...response.results.map((r, i) => card(r, i + 1)));
  state.seq += 1;
  grid.dataset.seq = String(state.seq); // lets tests (and people) see that a new answer arrived
  $("query-label").textContent = response.results.length ? `Results for ${label}` : `No results for ${label}`;
  setStatus(`${response.results.length} results in ${response.took_ms} ms`);
}

async function run(query, label, upload) {
  showError(null);
  const grid = $("results");
  grid.classList.add("loading");
  const k = Number($("k").value);
  const modality = $("modality").value || undefined;
  try {
    let response;
    if (upload) {
      const form = new FormData();
      form.append("file", upload);
      form.append("k", String(k));
      if (modality) form.append("modality", modality);
      response = await api("/search/image", { method: "POST", body: form });
    } else {
      response = await api("/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...query, k, modality }),
      });
    }
    render(response, label);
  } catch (err) {
    showError(err);
  } finally {
    grid.classList.remove("loading");
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("query").value.trim();
  if (!text) {
    showError(new Error("type something to search for"));
    return;
  }
  run({ text }, `“${text}”`);
});

$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (file) run(null, `the image ${file.name}`, file);
  $("upload").value = "";
});

$("token-row").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token-row").hidden = true;
  showError(null);
  loadHealth();
});

loadHealth();
