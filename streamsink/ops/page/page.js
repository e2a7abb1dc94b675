// The status page: reads status.json (see the README, "Operating") and redraws itself.
"use strict";
const EVERY_MS = 2000;
const previous = {}; // group -> {applied, at}: for events/s between two refreshes

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tbody, items, draw) {
  tbody.replaceChildren();
  for (const item of items) draw(tbody.insertRow(), item);
}

function drawGroup(group, now) {
  const node = document.getElementById("group").content.firstElementChild.cloneNode(true);
  node.dataset.group = group.name;
  const t = group.totals;
  const set = (field, text) => { node.querySelector(`[data-f="${field}"]`).textContent = text; };
  set("name", group.name);
  set("stream", group.stream);
  set("sinks", group.sinks.join(", "));
  set("lag", t.lag_known ? fmt(t.lag) : `${fmt(t.lag)}?`);
  set("pending", fmt(t.pending));
  set("applied", fmt(t.applied));
  set("ratio", t.coalescing_ratio === null ? "–" : `${t.coalescing_ratio.toFixed(1)}×`);
  set("saved", fmt(t.writes_saved));
  set("dead", fmt(t.dead));
  const before = previous[group.name];
  let rate = "–";
  if (before && now > before.at) rate = fmt(Math.round((t.applied - before.applied) * 1000 / (now - before.at)));
  previous[group.name] = { applied: t.applied, at: now };
  set("rate", rate);
  fill(node.querySelector(".shards tbody"), group.shards, (row, s) => {
    const m = s.telemetry || {};
    const state = s.state || m.state || (s.owner ? "running" : "unowned");
    cell(row, s.shard);
    cell(row, state, `state-${state}`);
    cell(row, s.lag === null ? "?" : fmt(s.lag), "num");
    cell(row, fmt(s.pending), "num");
    cell(row, m.stats ? fmt(m.stats.applied) : "–", "num");
    cell(row, fmt(s.dead), "num");
    cell(row, s.owner || "–");
    cell(row, s.epoch);
    cell(row, s.error || m.last_error || "", "reason");
  });
  fill(node.querySelector(".hot tbody"), group.hot_keys, (row, h) => {
    row.dataset.key = h.key;
    cell(row, h.key);
    cell(row, fmt(h.count), "num");
    cell(row, fmt(h.error), "num");
  });
  fill(node.querySelector(".tables tbody"), Object.entries(group.tables), (row, [name, c]) => {
    cell(row, name);
    cell(row, fmt(c.events), "num");
    cell(row, fmt(c.rows), "num");
    cell(row, c.coalescing_ratio === null ? "–" : `${c.coalescing_ratio.toFixed(1)}×`, "num");
    cell(row, fmt(c.writes_saved), "num");
  });
  fill(node.querySelector(".dead tbody"), group.dead_letters.slice().reverse(), (row, d) => {
    cell(row, d.shard);
    cell(row, d.entry);
    cell(row, d.reason, "reason");
  });
  return node;
}

function draw(doc) {
  const now = Date.now();
  document.getElementById("groups").replaceChildren(...doc.groups.map((g) => drawGroup(g, now)));
  fill(document.querySelector("#streams tbody"), doc.streams, (row, s) => {
    cell(row, s.name);
    cell(row, s.shards, "num");
    cell(row, fmt(s.length), "num");
  });
  const endpoints = doc.http_sinks.flatMap((sink) => sink.endpoints.map((e) => [sink.name, e]));
  document.getElementById("http-section").hidden = endpoints.length === 0;
  fill(document.querySelector("#http tbody"), endpoints, (row, [sink, e]) => {
    for (const v of [sink, e.endpoint, fmt(e.sent), fmt(e.failed), fmt(e.retried), fmt(e.dead), e.breaker]) cell(row, v);
  });
  if (doc.worker) document.getElementById("worker").textContent = `worker ${doc.worker.id}`;
  const updated = document.getElementById("updated");
  updated.textContent = `updated ${new Date(doc.generated_ms).toLocaleTimeString()}`;
  updated.dataset.generated = doc.generated_ms;
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const reply = await fetch("status.json", { cache: "no-store" });
    const doc = await reply.json();
    if (!reply.ok) throw new Error(doc.error || reply.statusText);
    draw(doc);
    error.hidden = true;
  } catch (e) {
    error.textContent = `status unavailable: ${e.message}`;
    error.hidden = false;
  } finally {
    setTimeout(refresh, EVERY_MS);
  }
}

document.getElementById("every").textContent = EVERY_MS / 1000;
refresh();
