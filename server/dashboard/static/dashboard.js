// The operator's dashboard: polls the coordinator's read-only JSON API and draws it.
//
// Everything the API returns is data: organization names, details and reasons came from the
// network. It is only ever put into the page with textContent (or as a Chart.js label, which
// is drawn on a canvas), never parsed as markup.
"use strict";

const REFRESH_MS = 2000;
const MISSING = "—";
const state = { jobId: null, metric: null, chart: null };

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

function cell(text, cls) {
  return el("td", text === null || text === undefined || text === "" ? MISSING : text, cls ? { class: cls } : {});
}

function fmt(value, digits) {
  if (typeof value !== "number" || !Number.isFinite(value)) return MISSING;
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(2);
  return value.toFixed(digits === undefined ? 3 : digits);
}

function when(iso) {
  if (!iso) return MISSING;
  const t = new Date(iso);
  return Number.isNaN(t.getTime()) ? String(iso) : t.toLocaleString();
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// ---- jobs ---------------------------------------------------------------------------

function roundText(job) {
  if (job.current_round === null || job.current_round === undefined) return MISSING;
  return job.num_rounds ? job.current_round + " / " + job.num_rounds : String(job.current_round);
}

function drawJobs(jobs) {
  const tbody = document.querySelector("#jobs tbody");
  document.getElementById("jobs-empty").hidden = jobs.length > 0;
  replaceRows(tbody, jobs.map((job) => {
    const tr = el("tr", null, { "data-job": job.id, "data-state": job.state });
    if (job.id === state.jobId) tr.classList.add("selected");
    tr.append(cell(job.id), cell(job.specialist));
    const stateCell = cell(null);
    stateCell.replaceChildren(el("span", job.state, { class: "state state-" + job.state }));
    tr.append(stateCell, cell(roundText(job), "num"), cell(when(job.started_at)), cell(when(job.finished_at)),
              cell(fmt(job.epsilon), "num"), cell(job.bytes === null ? MISSING : job.bytes, "num missing"));
    tr.addEventListener("click", () => selectJob(job.id));
    return tr;
  }));
}

function selectJob(id) {
  state.jobId = id;
  state.metric = null;
  history.replaceState(null, "", "#job=" + encodeURIComponent(id));
  refresh();
}

function defaultJob(jobs) {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("job");
  if (fromHash && jobs.some((j) => j.id === fromHash)) return fromHash;
  const running = jobs.find((j) => j.state === "running");
  return running ? running.id : (jobs.length ? jobs[0].id : null);
}

// ---- one job ------------------------------------------------------------------------

function orgList(names) {
  if (!names || !names.length) return cell(null);
  const td = el("td");
  const ul = el("ul", null, { class: "plain" });
  for (const name of names) ul.append(el("li", name));
  td.append(ul);
  return td;
}

function rejectedList(rejected) {
  if (!rejected || !rejected.length) return cell(null);
  const td = el("td");
  const ul = el("ul", null, { class: "plain" });
  for (const r of rejected) {
    const li = el("li", null, { "data-org": r.org });
    li.append(el("span", r.org), document.createTextNode(": "),
              el("span", r.reason || "rejected", { class: "reason" }));
    if (r.detail) li.append(document.createTextNode(" — " + r.detail));
    ul.append(li);
  }
  td.append(ul);
  return td;
}

function evalList(evaluations, metric) {
  const names = Object.keys(evaluations || {});
  if (!names.length || !metric) return cell(null);
  const td = el("td");
  const ul = el("ul", null, { class: "plain" });
  for (const name of names) {
    ul.append(el("li", name + " " + fmt((evaluations[name] || {})[metric]), { "data-org": name }));
  }
  td.append(ul);
  return td;
}

function drawRounds(view) {
  const tbody = document.querySelector("#rounds tbody");
  const metric = state.metric;
  // newest first: the current round is at the top while a job runs
  const rows = view.rounds.slice().reverse().map((r) => {
    const tr = el("tr", null, { "data-round": r.round, "data-state": r.state });
    if (r.round === view.current_round) tr.classList.add("current");
    tr.append(cell(r.round, "num"), cell(r.state), cell(r.sampled, "num"), orgList(r.accepted),
              rejectedList(r.rejected), cell(fmt(r.train_loss), "num"), evalList(r.eval, metric),
              cell(fmt(r.epsilon), "num"), cell(fmt(r.train_seconds, 1), "num"));
    return tr;
  });
  replaceRows(tbody, rows);
}

function drawRejections(view) {
  const rows = [];
  for (const r of view.rounds) {
    for (const x of r.rejected || []) rows.push([r.round, "update", x]);
    for (const x of r.eval_rejected || []) rows.push([r.round, "evaluation", x]);
  }
  document.getElementById("rejections-empty").hidden = rows.length > 0;
  replaceRows(document.querySelector("#rejections tbody"), rows.map(([round, stage, x]) => {
    const tr = el("tr", null, { "data-round": round, "data-org": x.org });
    tr.append(cell(round, "num"), cell(stage), cell(x.org), cell(x.reason, "reason"), cell(x.detail));
    return tr;
  }));
}

function drawMetricChoice(view) {
  const metrics = Object.keys(view.curves.organizations).sort();
  if (!state.metric || !metrics.includes(state.metric)) state.metric = view.curve_metric || metrics[0] || null;
  const select = document.getElementById("curve-metric");
  const current = Array.from(select.options).map((o) => o.value).join("\n");
  if (current !== metrics.join("\n")) {
    select.replaceChildren(...metrics.map((m) => el("option", m, { value: m })));
  }
  if (state.metric) select.value = state.metric;
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#7f7f7f", "#bcbd22"];

function drawCurves(view) {
  const canvas = document.getElementById("curve");
  const byOrg = view.curves.organizations[state.metric] || {};
  const datasets = Object.keys(byOrg).sort().map((org, i) => ({
    label: org,
    data: byOrg[org].map(([x, y]) => ({ x, y })),
    borderColor: COLORS[i % COLORS.length],
    backgroundColor: COLORS[i % COLORS.length],
    tension: 0,
  }));
  const overall = (view.curves.overall || {})[state.metric];
  if (overall) {
    datasets.push({ label: "overall", data: overall.map(([x, y]) => ({ x, y })), borderColor: "#000",
                    backgroundColor: "#000", borderDash: [6, 4], tension: 0 });
  }
  canvas.setAttribute("data-metric", state.metric || "");
  if (typeof Chart === "undefined") return;   // the vendored script failed to load: the tables still work
  if (!state.chart) {
    state.chart = new Chart(canvas, {
      type: "line",
      data: { datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
          y: { title: { display: true, text: state.metric || "" } },
        },
        plugins: { legend: { position: "right" } },
      },
    });
  } else {
    state.chart.data.datasets = datasets;
    state.chart.options.scales.y.title.text = state.metric || "";
    state.chart.update("none");
  }
}

function drawJob(view) {
  const job = view.job;
  document.getElementById("job").hidden = false;
  document.getElementById("job").setAttribute("data-job", job.id);
  document.getElementById("job-id").textContent = job.id;
  const badge = document.getElementById("job-state");
  badge.textContent = job.state;
  badge.className = "state state-" + job.state;
  const error = document.getElementById("job-error");
  error.hidden = !job.error;
  error.textContent = job.error || "";
  document.getElementById("job-round").textContent = roundText(job);
  document.getElementById("job-strategy").textContent = job.strategy || MISSING;
  document.getElementById("job-epsilon").textContent = fmt(job.epsilon);
  const bytes = document.getElementById("job-bytes");
  bytes.textContent = job.bytes === null ? MISSING : String(job.bytes);
  bytes.title = job.bytes === null ? ((view.not_recorded || {}).bytes || "") : "";
  drawMetricChoice(view);
  drawCurves(view);
  drawRounds(view);
  drawRejections(view);
}

// ---- specialists ----------------------------------------------------------------------

function drawSpecialists(specialists) {
  document.getElementById("specialists-empty").hidden = specialists.length > 0;
  replaceRows(document.querySelector("#specialists tbody"), specialists.map((s) => {
    const tr = el("tr", null, { "data-specialist": s.ref || s.name });
    tr.append(cell(s.ref || s.name), cell(when(s.created_at)), cell(s.job_id), cell(s.base_model),
              cell(s.rounds, "num"), cell(s.metric), cell(fmt(s.epsilon), "num"),
              cell(s.secure_aggregation ? "yes" : "no"), cell(s.parent));
    return tr;
  }));
}

// ---- the loop -----------------------------------------------------------------------

// what was last drawn: a table is rebuilt only when its data changed (a selection or a hover survives)
const drawn = {};

function changed(key, value) {
  const text = JSON.stringify(value);
  if (drawn[key] === text) return false;
  drawn[key] = text;
  return true;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [jobs, specialists] = await Promise.all([getJSON("/api/jobs"), getJSON("/api/specialists")]);
    if (!state.jobId || !jobs.jobs.some((j) => j.id === state.jobId)) state.jobId = defaultJob(jobs.jobs);
    if (changed("jobs", [state.jobId, jobs.jobs])) drawJobs(jobs.jobs);
    if (changed("specialists", specialists.specialists)) drawSpecialists(specialists.specialists);
    if (state.jobId) {
      const view = await getJSON("/api/jobs/" + encodeURIComponent(state.jobId));
      if (changed("job", [state.metric, view])) drawJob(view);
    } else {
      document.getElementById("job").hidden = true;
    }
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.classList.remove("stale");
  } catch (err) {
    status.textContent = "not updated: " + err.message;
    status.classList.add("stale");
  }
}

document.getElementById("curve-metric").addEventListener("change", (event) => {
  state.metric = event.target.value;
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
