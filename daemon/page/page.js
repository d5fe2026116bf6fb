// scandrop's status page. Everything live comes from the WebSocket (/api/ws): a snapshot, then one
// event per job change, each carrying the job's whole status. The page never polls; the only other
// requests are a job's own files when a person opens it, and a cancel.
//
// While a job runs, the page that opened it subscribes to its model ({"type": "subscribe", job_id})
// and shows each "model" message (the cameras and points so far) in the 3D view until the outputs
// replace it.
//
// With a token configured, the page asks for it once (or takes it from #token=... in the address)
// and keeps it in this browser's localStorage; files are then fetched with the Authorization header.

const TOKEN_KEY = "scandrop.token";
const VIEWER_MODULE = "/static/build/viewer.js";
const ACTIVE = new Set(["queued", "running"]);
const RECENT = 100; // finished jobs kept on a page that may stay open for weeks (as the snapshot)

const jobs = new Map(); // job_id -> status.json of the job, as the last event told it
const rows = new Map(); // job_id -> its <tr>
let token = takeToken();
let opened = null; // { id, viewer, urls } of the job shown in the job view
let socket = null;
let retryMs = 1000;
let synced = false; // a snapshot arrived on the current connection: the lists are the daemon's
const EMPTY_QUEUE = "Nothing queued. Drop photos, a video, a photo or a zip into the inbox.";

function takeToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(TOKEN_KEY);
}

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

async function api(path, options = {}) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { ...options, headers: { ...headers, ...options.headers } });
  if (response.status === 401) {
    askForToken(token ? "That token was not accepted." : "");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error?.message ?? `${response.status} ${response.statusText}`);
  }
  return response;
}

// ---- the live connection ----

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  socket = new WebSocket(`${scheme}//${location.host}/api/ws${query}`);
  let gotMessage = false;
  socket.onopen = () => {
    retryMs = 1000;
    $("connection").textContent = "live";
    if (opened) subscribe(opened.id); // a new connection knows nothing of the last one's
  };
  socket.onmessage = (message) => {
    gotMessage = true;
    receive(JSON.parse(message.data));
  };
  socket.onclose = async () => {
    synced = false;
    $("queue-empty").textContent = "Connecting…";
    $("connection").textContent = "reconnecting…";
    $("health").textContent = "not connected"; // what we knew is stale now
    $("health").className = "badge down";
    if (!gotMessage) {
      // A refused upgrade looks like any other close; ask the API why.
      try {
        await api("/api/status");
      } catch (error) {
        if (error.message === "unauthorized") return; // the token form reconnects
      }
    }
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

function send(message) {
  if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

const subscribe = (id) => send({ type: "subscribe", job_id: id });
const unsubscribe = (id) => send({ type: "unsubscribe", job_id: id });

function receive(event) {
  if (event.type === "model") {
    if (opened?.id === event.job_id) showLive(event);
    return;
  }
  if (event.type === "error") {
    console.warn("scandrop:", event.error.message);
    return;
  }
  if (event.type === "snapshot") {
    synced = true;
    jobs.clear();
    for (const job of event.jobs) jobs.set(job.job_id, job);
    showService(event.status);
  } else if (event.type === "service") {
    showService(event.status);
  } else if (event.job) {
    jobs.set(event.job.job_id, event.job);
  }
  const row = rows.get(event.job?.job_id);
  if (event.type === "progress" && row) updateRow(row, event.job); // the frequent case: one row
  else renderList();
  if (opened && (event.type === "snapshot" || event.job?.job_id === opened.id)) renderJob();
}

function showService(status) {
  const { health, device, queue } = status;
  $("health").textContent = health.ok ? "healthy" : `not healthy: ${health.problems.join("; ")}`;
  $("health").className = `badge ${health.ok ? "ok" : "down"}`;
  $("device").textContent = `device: ${device.name}`;
  const waiting = queue.waiting;
  $("waiting").hidden = waiting.length === 0;
  $("waiting").textContent = "Waiting for: " +
    waiting.map((w) => `${w.name} (${w.waiting_for === "files" ? "no files yet" : w.waiting_for === "slot" ? "a free slot" : "the copy to finish"})`).join(", ");
}

// ---- the job list ----

function duration(job) {
  if (!job.started_at) return "";
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  const seconds = Math.max(0, Math.round((end - Date.parse(job.started_at)) / 1000));
  return seconds < 60 ? `${seconds} s` : `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
}

function remaining(seconds) {
  const s = Math.max(1, Math.round(seconds));
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.round(s / 60)} min` : `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function newRow(id) {
  const row = el("tr", { className: "job" });
  row.dataset.job = id;
  row.append(
    el("td", { className: "name" }),
    el("td", {}, el("span", { className: "badge state" })),
    el("td", { className: "stage" }),
    el("td", { className: "bar" }, el("progress", { max: 1, value: 0 }), el("span", { className: "pct muted" })),
    el("td", { className: "time" }),
    el("td", { className: "actions" }),
  );
  row.addEventListener("click", (e) => {
    if (e.target.closest("button")) return;
    location.hash = `#job/${id}`;
  });
  return row;
}

function updateRow(row, job) {
  row.dataset.state = job.state;
  const cell = (selector) => row.querySelector(selector);
  const name = cell(".name");
  name.replaceChildren(el("span", { textContent: job.input.name }), " ", el("span", {
    className: "muted", textContent: job.kind.replace("_", " "),
  }));
  if (job.error) {
    name.append(...errorLines(job.error));
  } else if (job.duplicate_of) {
    name.append(el("div", { className: "hint", textContent: `same input as job ${job.duplicate_of}` }));
  }
  const badge = cell(".state");
  badge.textContent = job.state;
  badge.className = `badge state ${job.state}`;
  cell(".stage").textContent = job.stage ?? "";
  const progress = cell("progress");
  progress.value = job.progress;
  progress.title = job.eta_seconds == null ? "" : `about ${remaining(job.eta_seconds)} left`;
  cell(".pct").textContent = ` ${Math.round(job.progress * 100)}%`;
  cell(".time").textContent = duration(job);
  const actions = cell(".actions");
  if (ACTIVE.has(job.state) && !actions.firstChild) actions.append(cancelButton(job.job_id));
  if (!ACTIVE.has(job.state)) actions.replaceChildren();
}

// The same words as status.json and the log: stable code, message, and what to do about it.
function errorLines(error) {
  const lines = [el("div", { className: "error-text", textContent: `${error.code}: ${error.message}` })];
  if (error.hint) lines.push(el("div", { className: "hint", textContent: error.hint }));
  return lines;
}

function cancelButton(id) {
  const button = el("button", { type: "button", className: "danger cancel", textContent: "Cancel" });
  button.addEventListener("click", async () => {
    const job = jobs.get(id);
    if (!confirm(`Cancel the job for ${job?.input.name ?? id}?`)) return;
    button.disabled = true;
    try {
      await api(`/api/jobs/${id}/cancel`, { method: "POST" });
    } catch (error) {
      button.disabled = false;
      alert(`Could not cancel: ${error.message}`);
    }
  });
  return button;
}

function renderList() {
  const sorted = [...jobs.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  const queue = sorted.filter((j) => ACTIVE.has(j.state)).reverse(); // oldest first: next to run on top
  const finished = sorted.filter((j) => !ACTIVE.has(j.state));
  const recent = finished.slice(0, RECENT);
  for (const job of finished.slice(RECENT)) {
    if (job.job_id !== opened?.id) jobs.delete(job.job_id);
  }
  for (const [tbody, list] of [[$("queue"), queue], [$("recent"), recent]]) {
    for (const job of list) {
      let row = rows.get(job.job_id);
      if (!row) rows.set(job.job_id, (row = newRow(job.job_id)));
      updateRow(row, job);
      tbody.append(row); // moves an existing row; its buttons survive
    }
  }
  const shown = new Set([...queue, ...recent].map((j) => j.job_id));
  for (const [id, row] of rows) {
    if (!shown.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
  $("queue-empty").hidden = queue.length > 0;
  // Until the first snapshot the page knows nothing: "Nothing queued" would be a guess.
  $("queue-empty").textContent = synced ? EMPTY_QUEUE : "Connecting…";
}

setInterval(() => {
  for (const row of rows.values()) {
    if (row.dataset.state === "running") row.querySelector(".time").textContent = duration(jobs.get(row.dataset.job));
  }
}, 1000);

// ---- one job ----

function fileUrl(job, name) {
  return `/api/jobs/${job.job_id}/files/${encodeURIComponent(name)}`;
}

// A URL the browser can load directly: the file's own without a token, else a blob fetched with it.
async function loadableUrl(job, name) {
  if (!token) return fileUrl(job, name);
  const blob = await (await api(fileUrl(job, name))).blob();
  const url = URL.createObjectURL(blob);
  if (opened) opened.urls.push(url); // revoked when the job view closes
  return url;
}

function closeJob() {
  if (!opened) return;
  unsubscribe(opened.id);
  opened.viewer?.dispose();
  for (const url of opened.urls) URL.revokeObjectURL(url);
  opened = null;
}

function route() {
  const match = location.hash.match(/^#job\/([\w-]+)/);
  $("list-view").hidden = Boolean(match);
  $("job-view").hidden = !match;
  if (!match) {
    closeJob();
    return;
  }
  if (opened?.id !== match[1]) {
    closeJob();
    opened = { id: match[1], viewer: null, urls: [], rendered: null };
    subscribe(opened.id);
  }
  renderJob();
}

function renderJob() {
  const job = jobs.get(opened.id);
  if (!job) {
    // Older than the snapshot's recent jobs (a bookmark): ask for it once.
    $("job-title").textContent = `Looking for job ${opened.id}…`;
    const id = opened.id;
    api(`/api/jobs/${id}`)
      .then((response) => response.json())
      .then((found) => {
        jobs.set(found.job_id, found);
        if (opened?.id === id) renderJob();
      })
      .catch((error) => {
        if (opened?.id === id) $("job-title").textContent = `No job ${id}: ${error.message}`;
      });
    return;
  }
  $("job-title").replaceChildren(job.input.name, " ", el("span", { className: `badge ${job.state}`, textContent: job.state }));
  const summary = [
    ["Job", job.job_id], ["Kind", job.kind.replace("_", " ")], ["Stage", job.stage ?? "–"],
    ["Progress", `${Math.round(job.progress * 100)}%`], ["Time", duration(job) || "–"],
    ["Time left", job.eta_seconds == null ? "–" : `about ${remaining(job.eta_seconds)}`],
    ["Input", `${job.input.files} file(s), ${formatBytes(job.input.bytes)} — now in ${job.input.location}`],
    ["Outbox", job.outbox],
  ];
  const table = el("table", {}, ...factRows(summary));
  const bar = el("progress", { max: 1, value: job.progress });
  const parts = [table, bar];
  if (ACTIVE.has(job.state)) parts.push(" ", cancelButton(job.job_id));
  $("job-summary").replaceChildren(...parts);
  $("job-error").hidden = !job.error;
  if (job.error) {
    $("job-error").replaceChildren(...errorLines(job.error));
  }
  // Outputs appear once, when the job has finished: render them only then, and only once.
  const key = `${job.state}:${job.outputs.length}`;
  if (opened.rendered === key) return;
  opened.rendered = key;
  renderOutputs(job);
}

function renderOutputs(job) {
  const names = new Set(job.outputs.map((o) => o.name));
  $("job-files").hidden = job.outputs.length === 0;
  $("files").replaceChildren(...job.outputs.map((output) => {
    const link = el("a", { href: fileUrl(job, output.name), textContent: output.name, download: output.name });
    if (token) {
      link.addEventListener("click", async (e) => {
        e.preventDefault();
        const a = el("a", { href: await loadableUrl(job, output.name), download: output.name });
        a.click();
      });
    }
    return el("li", {}, link, el("span", { className: "muted", textContent: ` ${formatBytes(output.size)}` }));
  }));
  $("job-preview").hidden = !names.has("preview.png");
  if (names.has("preview.png")) loadableUrl(job, "preview.png").then((url) => { $("preview").src = url; });
  renderReport(job.report);
  const views = [["mesh", "model.glb"], ["splats", "splats.splat"]].filter(([, name]) => names.has(name));
  const live = ACTIVE.has(job.state) && $("viewer").dataset.kind === "live"; // keep the live view
  $("job-3d").hidden = views.length === 0 && !live;
  for (const button of document.querySelectorAll("#job-3d .tabs button")) {
    const view = views.find(([kind]) => kind === button.dataset.show);
    button.hidden = !view;
    button.onclick = () => show3d(job, ...view);
  }
  if (views.length) show3d(job, ...views[0]);
}

// The viewer of the opened job, made on first use (its bundle is loaded only then).
async function viewerOf(view) {
  if (!view.viewer) {
    let module;
    try {
      module = await import(VIEWER_MODULE);
    } catch {
      throw new Error("the 3D viewer is not built into this scandrop: run `npm ci --prefix web` in its folder, then reload");
    }
    if (opened !== view || view.viewer) return view.viewer;
    view.viewer = new module.Viewer($("viewer"));
  }
  return view.viewer;
}

// The running job's model so far; once the job has outputs, they are shown instead.
async function showLive(event) {
  const view = opened;
  const job = jobs.get(event.job_id);
  if (!ACTIVE.has(job?.state)) return;
  $("job-3d").hidden = false;
  for (const button of document.querySelectorAll("#job-3d .tabs button")) button.hidden = true;
  try {
    const viewer = await viewerOf(view);
    if (opened !== view || !viewer || view.rendered?.startsWith("succeeded")) return;
    viewer.showLive(event.model);
    const m = event.model;
    const shown = m.points.length / 16; // 12 bytes a point, 16 characters of base64
    $("viewer-note").textContent = `Live (${event.stage}): ${m.cameras} photos placed, ${m.kind} points ${shown.toLocaleString("en")} of ${m.points_total.toLocaleString("en")} shown.`;
  } catch (error) {
    if (opened === view) $("viewer-note").textContent = `Could not show the live model: ${error.message}`;
  }
}

async function show3d(job, kind, name) {
  for (const button of document.querySelectorAll("#job-3d .tabs button")) {
    button.setAttribute("aria-pressed", String(button.dataset.show === kind));
  }
  const view = opened; // the person may leave the job while this loads
  const container = $("viewer");
  try {
    await viewerOf(view);
    if (opened !== view) return;
    const bytes = await (await api(fileUrl(job, name))).arrayBuffer();
    if (opened !== view) return;
    await view.viewer.show(kind, bytes);
    $("viewer-note").textContent = "Drag to turn, scroll to zoom, right-drag to pan.";
  } catch (error) {
    if (opened !== view) return;
    container.dataset.state = "error";
    $("viewer-note").textContent = `Could not show ${name}: ${error.message}`;
  }
}

function renderReport(report) {
  $("job-report").hidden = !report;
  if (!report) return;
  const images = report.images ?? {};
  const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
  const facts = [
    ["Photos placed", `${images.registered ?? "–"} of ${images.usable ?? "–"} usable (${images.input ?? "–"} dropped)`],
    ["Reprojection error", report.mean_reprojection_error_px == null ? "–" : `${report.mean_reprojection_error_px.toFixed(2)} px`],
    ["Points", number(report.points)], ["Triangles", number(report.triangles)],
    ["Splats", `${number(report.splats)}${report.splat_method ? ` (${report.splat_method})` : ""}`],
    ["Preset", report.preset ?? "–"], ["Time", report.seconds == null ? "–" : `${report.seconds.toFixed(1)} s`],
    ["Peak memory", report.peak_rss_mb == null ? "–" : `${Math.round(report.peak_rss_mb)} MB`],
  ];
  const rejected = images.rejected ?? [];
  if (rejected.length) facts.push(["Skipped", rejected.map((r) => `${r.file}: ${r.reason}`).join("; ")]);
  if ((images.unregistered ?? []).length) facts.push(["Not placed", images.unregistered.join(", ")]);
  $("report").replaceChildren(...factRows(facts));
  const stages = report.stages ?? [];
  $("stages").replaceChildren(
    el("tr", {}, ...["Stage", "Backend", "Seconds", "Peak MB"].map((h) => el("th", { className: "muted", textContent: h }))),
    ...stages.map((s) => el("tr", {}, ...[s.name, s.backend ?? "", s.seconds?.toFixed(1) ?? "", s.peak_rss_mb == null ? "" : Math.round(s.peak_rss_mb)].map((v) => el("td", { textContent: v })))),
  );
}

function factRows(facts) {
  return facts.map(([k, v]) => el("tr", {}, el("td", { className: "muted", textContent: k }), el("td", { textContent: v })));
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// ---- the token ----

function askForToken(message) {
  $("token-form").hidden = false;
  $("token-error").textContent = message;
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token-input").value.trim();
  localStorage.setItem(TOKEN_KEY, token);
  $("token-form").hidden = true;
  if (socket) {
    socket.onclose = null;
    socket.close();
  }
  connect();
});

window.addEventListener("hashchange", route);
route();
connect();
