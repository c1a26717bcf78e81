// mlxd status page: polls /status once a second and fills the page. No dependencies.
"use strict";

const GIB = 1024 ** 3, MIB = 1024 ** 2;
const $ = (id) => document.getElementById(id);

function size(bytes) {
  if (bytes == null) return "—";
  if (Math.abs(bytes) >= GIB) return (bytes / GIB).toFixed(2) + " GiB";
  return (bytes / MIB).toFixed(1) + " MiB";
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(cell(c));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

const AVAILABILITY = {
  present: "present", too_big: "too big for the budget", download: "would download",
  import: "would import", missing: "missing",
};

function renderMemory(memory) {
  const budget = memory.budget || 1;
  const weights = memory.resident_weights || 0;
  const kv = memory.reserved || 0;
  const prefix = memory.prefix_cache || 0;
  const free = Math.max(0, budget - weights - kv - prefix);
  const pct = (n) => Math.min(100, (100 * n) / budget).toFixed(2) + "%";
  $("bar-weights").style.width = pct(weights);
  $("bar-kv").style.width = pct(kv);
  $("bar-prefix").style.width = pct(prefix);
  $("mem-weights").textContent = size(weights);
  $("mem-kv").textContent = size(kv);
  $("mem-prefix").textContent = size(prefix);
  $("mem-free").textContent = size(free);
  $("mem-budget").textContent = size(memory.budget);
  $("mem-basis").textContent = memory.budget_basis ? "(" + memory.budget_basis + ")" : "";
  $("mem-in-use").textContent = size(memory.in_use);
  $("memory-summary").textContent =
    size(weights + kv + prefix) + " planned of " + size(memory.budget);
}

function renderModels(models) {
  const body = $("models");
  body.replaceChildren(...models.map((m) => row(
    [m.id, m.status, AVAILABILITY[m.availability] || m.availability,
     m.estimated_memory_bytes != null ? size(m.estimated_memory_bytes) : "—",
     m.error || m.availability_detail || ""],
    { "data-model": m.id, "data-availability": m.availability },
  )));
}

function renderRecent(recent) {
  const body = $("recent");
  if (!recent.length) return;
  body.replaceChildren(...recent.map((r) => row(
    [new Date(r.at * 1000).toLocaleTimeString(), r.api, r.model, r.prompt_tokens,
     r.cached_tokens, r.completion_tokens,
     r.ttft_ms == null ? "—" : Math.round(r.ttft_ms) + " ms",
     r.completion_tokens > 1 ? r.tok_s.toFixed(1) : "—", r.finish],
    { "data-request": r.id },
  )));
}

function render(data) {
  const h = data.health;
  $("version").textContent = "v" + h.version;
  $("backend").textContent = h.backend;
  $("resident-model").textContent = h.resident_model || "none loaded";
  $("resident-state").textContent = h.resident_state || "—";
  $("running").textContent = h.active_requests;
  $("queued").textContent = h.queue_depth;
  $("swaps").textContent = h.swaps;
  $("uptime").textContent = duration(h.uptime_s);
  const pressure = $("pressure");
  pressure.textContent = h.memory.pressure;
  pressure.dataset.level = h.memory.pressure;
  $("pressure-reasons").textContent = (h.memory.pressure_reasons || []).join("; ") ||
    (h.memory.admission_paused ? "admission paused" : "");
  renderMemory(h.memory);
  renderModels(data.models);
  renderRecent(data.recent_requests);
}

async function poll() {
  const badge = $("connection");
  try {
    const response = await fetch("/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    badge.textContent = "live";
    badge.dataset.state = "live";
  } catch (err) {
    // The server may be restarting; say so on the page and try again.
    badge.textContent = "server unreachable";
    badge.dataset.state = "down";
  }
  setTimeout(poll, 1000);
}

poll();
