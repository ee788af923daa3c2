// The service's page: a form over the JSON API (GET /model, POST /generate), no build
// step and nothing loaded from elsewhere. Every error shown is the API's own message.
"use strict";

const $ = (id) => document.getElementById(id);
let card = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status}: ${body.error}`;
  } catch (e) { /* not JSON */ }
  return `${resp.status}: ${resp.statusText || "request failed"}`;
}

function addOptions(select, values) {
  for (const v of values) {
    const o = document.createElement("option");
    o.value = o.textContent = v;
    select.appendChild(o);
  }
}

async function loadModel() {
  const resp = await fetch("/model", { headers: headers() });
  if (resp.status === 401) {
    $("key-field").hidden = false;
    $("model").textContent = "This service needs an API key: enter it, then generate.";
    return;
  }
  if (!resp.ok) {
    $("model").textContent = "";
    showError(await apiError(resp));
    return;
  }
  card = await resp.json();
  const audit = card.audit && card.audit.verdict ? `audit: ${card.audit.verdict}` : "not audited";
  $("model").textContent =
    `${card.run}: ${card.preset} UNet, ${card.parameters.toLocaleString()} parameters, ` +
    `${card.channels} x ${card.image_size} x ${card.image_size} images of ${card.data}; ` +
    `defense ${card.defense ? "on" : "off"}, ${audit}; at most ${card.limits.max_n} images ` +
    `and ${card.limits.max_image_steps} image-steps a request.`;
  if (card.conditional) {
    $("class-field").hidden = false;
    addOptions($("class"), card.classes);
  }
  addOptions($("sampler"), card.samplers);
  addOptions($("device_class"), card.device_classes || []);
  $("n").max = card.limits.max_n;
  $("steps").placeholder = `from the budget (default ${card.defaults.steps})`;
}

function requestBody() {
  const body = { n: Number($("n").value), seed: Number($("seed").value) };
  // Empty fields are left out: the API's defaults and budget planning apply.
  if ($("class").value !== "") body["class"] = $("class").value;
  if ($("sampler").value !== "") body.sampler = $("sampler").value;
  if ($("steps").value !== "") body.steps = Number($("steps").value);
  if ($("latency_s").value !== "") body.latency_s = Number($("latency_s").value);
  if ($("energy_j").value !== "") body.energy_j = Number($("energy_j").value);
  if ($("device_class").value !== "") body.device_class = $("device_class").value;
  return body;
}

function fmt(v, unit) {
  return v === null || v === undefined ? "n/a" : `${Number(v).toPrecision(3)} ${unit}`;
}

function figure(im) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + im.png;
  img.alt = `sample ${im.index}` + (im["class"] ? ` of class ${im["class"]}` : "");
  fig.appendChild(img);
  const cap = document.createElement("figcaption");
  const lines = [
    `${im.sampler} ${im.steps} steps, on the ${im.where}`,
    `latency ${fmt(im.predicted_latency_s, "s")}, energy ${fmt(im.predicted_energy_j, "J")}`,
  ];
  if (im["class"]) lines.unshift(`class ${im["class"]}`);
  cap.textContent = lines.join(" · ");
  if ("flagged" in im) {  // the operator's view (--show-flags) only
    const v = document.createElement("div");
    v.className = im.flagged ? "flagged verdict" : "verdict";
    v.textContent = im.flagged ? "defense: trigger flagged, input negated" : "defense: clean input";
    cap.appendChild(v);
  }
  fig.appendChild(cap);
  return fig;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("status").textContent = "generating...";
  const t0 = performance.now();
  try {
    const resp = await fetch("/generate", { method: "POST", headers: headers(),
                                            body: JSON.stringify(requestBody()) });
    if (!resp.ok) {
      $("status").textContent = "";
      showError(await apiError(resp));
      if (resp.status === 401) $("key-field").hidden = false;
      return;
    }
    const out = await resp.json();
    const seconds = (performance.now() - t0) / 1000;
    $("images").replaceChildren(...out.images.map(figure));
    $("status").textContent = `${out.images.length} images in ${seconds.toFixed(2)} s ` +
      `(server ${out.server_s.toFixed(2)} s, batched with ${out.batch_requests - 1} other requests)`;
    if (!card) loadModel();
  } catch (e) {
    $("status").textContent = "";
    showError(`the service did not answer: ${e}`);
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
loadModel();
