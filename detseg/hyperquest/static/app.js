// HyperQuest's page: one view at a time (login, survey, home, trial, leaderboard), chosen by the URL hash.
// Everything comes from the JSON API; text from the server is always inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEWS = ["login-view", "survey-view", "home-view", "trial-view", "leaderboard-view"];
const BUSY = new Set(["preparing", "queued", "running"]);
const POLL_MS = 800;
// While an epoch waits far back in the queue, its place changes slowly: poll less often the more players are ahead
// (0.8 s when next or running, up to 5 s), so a full class waiting does not flood the server with polls.
const POLL_MAX_MS = 5000;
function pollDelay(trial) {
  return Math.min(POLL_MAX_MS, POLL_MS * (1 + Math.max(0, trial.queue_ahead || 0) / 2));
}
const app = { me: null, limits: null, trial: null, pollTimer: null, formFilledFor: null };

// ---- talking to the server ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function describeError(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {   // pydantic: [{loc: ["body", "train", "hparams", "lr"], msg}]
    return detail.map((d) => `${d.loc.filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return "something went wrong";
}

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response = await fetch(path, options);
  // 503: the database is restarting and nothing was changed, so the same request is safe to send again.
  for (let tries = 0; response.status === 503 && tries < 5; tries++) {
    const wait = Math.min(10, Number(response.headers.get("Retry-After")) || 2);
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    response = await fetch(path, options);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, describeError(data.detail));
  return data;
}

// ---- small DOM helpers -------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function fillTable(table, rows) {   // rows: [[cell, cell, ...], ...]; a row array may carry .attrs
  table.replaceChildren(...rows.map((cells) => el("tr", cells.attrs || {}, ...cells.map((c) => el("td", {}, c)))));
}

const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)}%`);
const num = (x, digits = 4) => (x === null || x === undefined ? "—" : Number(x).toPrecision(digits));

function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function show(view) {
  for (const id of VIEWS) $(id).hidden = id !== view;
}

async function guarded(work) {   // run an action; show its error instead of throwing
  try {
    say("");
    return await work();
  } catch (error) {
    if (error.status === 401) { app.me = null; location.hash = "#/"; route(); }
    say(error.message);
    return null;
  }
}

// ---- routing -----------------------------------------------------------------------------------------------
async function route() {
  clearTimeout(app.pollTimer);
  const hash = location.hash || "#/";
  $("who").hidden = $("logout").hidden = !app.me;
  if (app.me) $("who").textContent = `${app.me.name} (${app.me.player_id})`;
  if (hash === "#/leaderboard") return showLeaderboard();
  if (!app.me) return show("login-view");
  if (!app.me.survey_done) return show("survey-view");
  const trialMatch = hash.match(/^#\/trial\/(\d+)$/);
  if (trialMatch) return openTrial(Number(trialMatch[1]));
  return showHome();
}

// ---- login, survey, home -----------------------------------------------------------------------------------
$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(async () => {
    const typed = { player_id: $("login-id").value.trim(), name: $("login-name").value.trim() };
    app.me = await api("POST", "/api/login", typed);
    location.hash = app.me.active_trial ? `#/trial/${app.me.active_trial}` : "#/";
    route();
  });
});

$("logout").addEventListener("click", () => guarded(async () => {
  await api("POST", "/api/logout");
  app.me = null;
  location.hash = "#/";
  route();
}));

$("survey-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const answers = {
    experience: form.experience.value,
    courses: Number(form.courses.value || 0),
    frameworks: [...form.querySelectorAll("input[name=frameworks]:checked")].map((box) => box.value),
    trained_before: form.trained_before.checked,
    comments: form.comments.value,
  };
  guarded(async () => {
    app.me = await api("POST", "/api/survey", answers);
    route();
  });
});

async function showHome() {
  show("home-view");
  const limits = app.limits;
  for (const span of document.querySelectorAll(".epoch-limit")) span.textContent = limits.epoch_limit;
  $("limits-text").textContent =
    `Limits: learning rate in (0, ${limits.lr.max}], dropout in [0, 1), batch size ${limits.batch_size.min}–` +
    `${limits.batch_size.max}, weight decay ≤ ${limits.weight_decay.max}, width ≤ ${limits.width.max.mlp} ` +
    `(MLP) / ${limits.width.max.convnet} (ConvNet), at most ${limits.max_blocks} hidden layers after growing, ` +
    `growth factor ≤ ${limits.grow_factor.max}.`;
  const trials = await guarded(() => api("GET", "/api/trials")) || [];
  $("trial-list").replaceChildren(...trials.map((t) => el("li", {},
    el("a", { href: `#/trial/${t.id}` }, `Trial ${t.id}`),
    ` — ${t.state}, epoch ${t.epoch}${t.final_val_acc !== null ? `, score ${pct(t.final_val_acc)}` : ""}`)));
}

async function startTrial() {
  await guarded(async () => {
    const trial = await api("POST", "/api/trials");
    location.hash = `#/trial/${trial.id}`;
  });
}
$("new-trial").addEventListener("click", startTrial);
$("again").addEventListener("click", startTrial);

// ---- a trial -----------------------------------------------------------------------------------------------
async function openTrial(id) {
  show("trial-view");
  const trial = await guarded(() => api("GET", `/api/trials/${id}`));
  if (trial) renderTrial(trial);
}

function stateText(trial) {
  switch (trial.state) {
    case "preparing": return "generating the data set…";
    case "queued": return trial.queue_ahead ? `queued (${trial.queue_ahead} ahead of you)`
      : trial.queue_ahead === 0 ? "queued (you are next)" : "queued";
    case "running": return `training epoch ${trial.epoch + 1}…`;
    case "ready": return trial.epoch === 0 ? "ready to train" : `epoch ${trial.epoch} of ${trial.epoch_limit}`;
    case "diverged": return `epoch ${trial.epoch}: diverged (NaN/inf loss) — revert or stop`;
    case "finished": return `finished at epoch ${trial.epoch}`;
    default: return trial.state;
  }
}

function renderDataset(dataset) {
  const s = dataset.summary;
  if (!s) return fillTable($("dataset-stats"), [["status", "being generated…"]]);
  fillTable($("dataset-stats"), [
    ["data set", `#${dataset.pool_index}: ${s.description}`],
    ["kind", s.kind],
    ["input shape", s.input_shape.join(" × ")],
    ["classes", s.num_classes],
    ["training examples", s.train_size],
    ["validation examples", s.val_size],
    ["class balance (smallest / largest class)", s.class_balance.toFixed(2)],
    ["training examples per class", s.class_counts_train.join(", ")],
  ]);
}

function renderLayers(trial) {
  if (!trial.layers) {
    const net = trial.network || app.limits.default_network;
    return fillTable($("layers"), [["not built yet", `${net.arch}, width ${net.width}, depth ${net.depth}`]]);
  }
  const rows = trial.layers.map((layer) => [
    layer.kind === "classifier" ? "classifier" : `layer ${layer.index}`,
    `${layer.kind}, ${layer.width} ${layer.kind === "conv" ? "channels" : "units"}`,
    `${layer.params.toLocaleString()} parameters`]);
  fillTable($("layers"), rows);
}

function fillForms(trial) {
  // Only when a trial is opened or after an action: polling must not overwrite what the player is typing.
  const key = `${trial.id}:${trial.checkpoints.length}:${trial.state === "finished"}`;
  if (app.formFilledFor === key) return;
  app.formFilledFor = key;
  const hp = trial.hparams;
  $("hp-lr").value = hp.lr; $("hp-dropout").value = hp.dropout; $("hp-batch").value = hp.batch_size;
  $("hp-wd").value = hp.weight_decay; $("hp-optimizer").value = hp.optimizer;
  const net = trial.network || app.limits.default_network;
  $("net-arch").value = net.arch; $("net-width").value = net.width; $("net-depth").value = net.depth;
  $("net-arch").querySelector("[value=convnet]").disabled = trial.dataset.summary?.kind !== "image";
  const hidden = (trial.layers || []).filter((layer) => layer.kind !== "classifier");
  $("grow-layer").replaceChildren(...hidden.map((layer) =>
    el("option", { value: layer.index }, `layer ${layer.index} (${layer.width})`)));
  $("revert-to").replaceChildren(...trial.checkpoints.map((c) => {
    const label = c.kind === "grow" ? `epoch ${c.epoch}, grown: ${c.note}` :
      `epoch ${c.epoch} (val ${c.diverged ? "diverged" : pct(c.val_acc)})`;
    const option = el("option", { value: c.id }, c.current ? `${label} — current` : label);
    option.selected = c.current;
    return option;
  }));
}

function renderControls(trial) {
  const started = trial.checkpoints.length > 0;
  const ready = trial.state === "ready";
  const settled = ready || trial.state === "diverged";
  $("network-form").hidden = started;
  $("train").disabled = !ready;
  $("grow").disabled = !(ready && started);
  $("revert").disabled = !(settled && started);
  $("stop").disabled = !(settled && started);
  $("controls").hidden = trial.state === "finished" || trial.state === "failed";
  const wider = $("grow-how").value === "wider";
  $("grow-factor-label").hidden = !wider;
  $("grow-layer-label").textContent = wider ? "Layer" : "After layer";
}

function renderPlots(trial) {
  const h = trial.history;
  const x = h.map((row) => row.epoch);
  const line = (y, name, dash) => ({ x, y, name, mode: "lines+markers", line: { dash } });
  const layout = (title, yTitle) => ({
    title: { text: title, x: 0.02 }, margin: { t: 40, r: 10, b: 45, l: 55 },
    legend: { orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom" },
    xaxis: { title: { text: "epoch" }, dtick: 1, rangemode: "tozero" }, yaxis: { title: { text: yTitle } },
  });
  const loss = [line(h.map((r) => r.train_loss), "train loss"), line(h.map((r) => r.val_loss), "validation loss", "dot")];
  const diverged = h.filter((r) => r.diverged);
  if (diverged.length) {
    loss.push({ x: diverged.map((r) => r.epoch), y: diverged.map(() => 0), name: "diverged", mode: "markers",
                marker: { symbol: "x", size: 12, color: "#c0392b" } });
  }
  const acc = [line(h.map((r) => r.train_acc), "train accuracy"), line(h.map((r) => r.val_acc), "validation accuracy", "dot")];
  const config = { displayModeBar: false, responsive: true };
  Plotly.react("loss-plot", loss, layout("Loss", "cross-entropy"), config);
  Plotly.react("acc-plot", acc, { ...layout("Accuracy", "accuracy"), yaxis: { title: { text: "accuracy" }, range: [0, 1] } }, config);
}

function baselineRows(b) {
  const draws = b.random_search === null && b.random_search_draws_done < b.random_search_draws
    ? `computing (${b.random_search_draws_done}/${b.random_search_draws})` : pct(b.random_search);
  return [
    ["majority class", pct(b.majority), "majority"],
    ["logistic regression", b.logistic_regression === null ? "computing…" : pct(b.logistic_regression),
     "logistic_regression"],
    ["default network, default hyperparameters", b.default_network === null ? "computing…" : pct(b.default_network),
     "default_network"],
    [`random search (best of ${b.random_search_draws} draws)`, draws, "random_search"],
  ];
}

function renderFinal(trial) {
  $("final").hidden = !trial.final;
  if (!trial.final) return;
  $("final-acc").textContent = pct(trial.final.val_acc);
  $("final-note").textContent = trial.final.diverged ? "(the network had diverged)" :
    trial.final.reason === "epoch_limit" ? `(epoch limit ${trial.epoch_limit} reached)` : "";
  fillTable($("final-baselines"), [["you", pct(trial.final.val_acc)],
    ...baselineRows(trial.baselines).map(([name, value, key]) =>
      Object.assign([name, value], { attrs: { class: "baseline", "data-baseline": key } }))]);
}

function renderTrial(trial) {
  app.trial = trial;
  $("trial-id").textContent = trial.id;
  $("trial-state").textContent = stateText(trial);
  $("trial-state").dataset.state = trial.state;
  if (trial.last_error) say(trial.last_error);
  renderDataset(trial.dataset);
  renderLayers(trial);
  fillForms(trial);
  renderControls(trial);
  renderPlots(trial);
  renderFinal(trial);
  clearTimeout(app.pollTimer);
  if (BUSY.has(trial.state)) app.pollTimer = setTimeout(() => poll(trial.id), pollDelay(trial));
  else if (trial.baselines && baselinesPending(trial.baselines)) {   // they fill in while others play
    app.pollTimer = setTimeout(() => poll(trial.id), 5 * POLL_MS);
  }
}

function baselinesPending(b) {
  return b.logistic_regression === null || b.default_network === null || b.random_search === null;
}

async function poll(id) {
  if (location.hash !== `#/trial/${id}`) return;
  try {
    renderTrial(await api("GET", `/api/trials/${id}`));
  } catch (error) {   // a hiccup: keep polling
    app.pollTimer = setTimeout(() => poll(id), 3 * POLL_MS);
  }
}

async function act(body) {
  const trial = await guarded(() => api("POST", `/api/trials/${app.trial.id}/actions`, body));
  if (trial) renderTrial(trial);
}

const numberOf = (id) => Number($(id).value);

$("train-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = {
    action: "train",
    hparams: { lr: numberOf("hp-lr"), dropout: numberOf("hp-dropout"), batch_size: numberOf("hp-batch"),
               weight_decay: numberOf("hp-wd"), optimizer: $("hp-optimizer").value },
  };
  if (!app.trial.checkpoints.length) {
    body.network = { arch: $("net-arch").value, width: numberOf("net-width"), depth: numberOf("net-depth") };
  }
  act(body);
});

$("grow-how").addEventListener("change", () => app.trial && renderControls(app.trial));

$("grow-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = { action: "grow", how: $("grow-how").value, layer: Number($("grow-layer").value) };
  if (body.how === "wider") body.factor = numberOf("grow-factor");
  act(body);
});

$("revert-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act({ action: "revert", checkpoint_id: Number($("revert-to").value) });
});

$("stop").addEventListener("click", () => act({ action: "stop" }));

// ---- leaderboard -------------------------------------------------------------------------------------------
async function showLeaderboard() {
  show("leaderboard-view");
  const board = await guarded(() => api("GET", "/api/leaderboard"));
  if (!board) return;
  const header = (...names) => el("tr", {}, ...names.map((n) => el("th", {}, n)));
  $("overall").replaceChildren(header("#", "player", "data set", "validation accuracy", "skill", "epochs"),
    ...board.overall.map((e, i) => el("tr", { "data-trial": e.trial_id }, el("td", {}, i + 1), el("td", {}, e.player),
      el("td", {}, `#${e.pool_index} ${e.dataset}`), el("td", {}, pct(e.val_acc)),
      el("td", {}, num(e.skill, 3)), el("td", {}, e.epochs))));
  $("per-dataset").replaceChildren(...board.datasets.map((d) => {
    const s = d.summary || {};
    const table = el("table", { class: "board", "data-dataset": d.id },
      header("#", "player / baseline", "validation accuracy"),
      ...d.entries.map((e, i) => el("tr", { "data-trial": e.trial_id }, el("td", {}, i + 1), el("td", {}, e.player),
        el("td", {}, pct(e.val_acc)))),
      ...baselineRows(d.baselines).map(([name, value, key]) =>
        el("tr", { class: "baseline", "data-baseline": key }, el("td", {}, ""), el("td", {}, name), el("td", {}, value))));
    return el("div", {}, el("h3", {},
      `Data set #${d.pool_index}: ${s.description || d.name} — ${s.kind}, ${s.num_classes} classes, ` +
      `${s.train_size} train / ${s.val_size} val`), table);
  }));
  clearTimeout(app.pollTimer);
  if (board.datasets.some((d) => baselinesPending(d.baselines))) {
    app.pollTimer = setTimeout(() => location.hash === "#/leaderboard" && showLeaderboard(), 5000);
  }
}

// ---- start -------------------------------------------------------------------------------------------------
async function boot() {
  app.limits = await api("GET", "/api/limits");
  try { app.me = await api("GET", "/api/me"); } catch (error) { app.me = null; }
  window.addEventListener("hashchange", route);
  route();
}
boot();
