// convserve's page: a client of the server's own V2 HTTP API (and its /convserve/v1 introspection),
// nothing else. Feature maps arrive as binary tensors (Triton's binary extension) and are drawn on
// canvases here; the token, when the server wants one, is asked for once and kept in this variable only.
"use strict";

let token = null;
const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function call(path, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers || {});
    if (token) headers["Authorization"] = "Bearer " + token;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (response.status === 401 && token === null) {
      token = window.prompt("This server needs its token:") || "";
      continue;
    }
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }
}

async function loadModels() {
  const index = await (await call("/v2/repository/index", { method: "POST", body: "{}" })).json();
  const names = [...new Set(index.filter((m) => m.state === "READY").map((m) => m.name))].sort();
  const select = $("model");
  select.innerHTML = "";
  for (const name of names) select.add(new Option(name, name));
  if (!names.length) showError("no model is ready on this server");
  modelChanged();
}

function modelChanged() {
  const examples = $("examples");
  examples.hidden = $("model").value !== "digits";
  if (!examples.hidden && examples.querySelectorAll("img").length === 0) {
    for (let digit = 0; digit < 10; digit++) {
      const img = document.createElement("img");
      img.src = "/static/examples/" + EXAMPLES[digit];
      img.alt = img.title = "digit " + digit;
      img.addEventListener("click", async () => {
        const bytes = await (await fetch(img.src)).arrayBuffer();
        classify(new Uint8Array(bytes));
      });
      examples.appendChild(img);
    }
  }
}

const EXAMPLES = ["0-test20.png", "1-test90.png", "2-test2.png", "3-test13.png", "4-test68.png",
  "5-test109.png", "6-test196.png", "7-test44.png", "8-test28.png", "9-test159.png"];

// ---- one request ---------------------------------------------------------------------------------

// What the last request showed; cleared when a new one fails, so no stale answer stands beside an error.
function clearAnswer() {
  $("answer").hidden = true;
  $("bars").innerHTML = "";
  $("metrics").innerHTML = "";
  $("layers").innerHTML = "";
  $("seen").hidden = true;
}

// The image as the model sees it (its card's preprocessing: for digits, the ink step, then the resize),
// from the server's own code, beside the image that was sent.
async function showSeen(model, image) {
  const sent = URL.createObjectURL(new Blob([image]));
  const response = await call("/convserve/v1/models/" + encodeURIComponent(model) + "/preprocess", {
    method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: image,
  });
  const seen = URL.createObjectURL(await response.blob());
  const preprocessed = $("preprocessed");
  await new Promise((resolve) => { preprocessed.onload = resolve; preprocessed.onerror = resolve; preprocessed.src = seen; });
  $("sent").src = sent;
  $("seen-caption").textContent = "as the model saw it, " + preprocessed.naturalWidth + "×" + preprocessed.naturalHeight;
  $("seen").hidden = false;
}

async function classify(image) {
  showError("");
  const model = $("model").value;
  const fp16 = $("fp16").checked;
  $("status").textContent = "asking " + model + " …";
  try {
    const described = await (await call("/convserve/v1/models/" + encodeURIComponent(model) + "/describe")).json();
    const maps = described.feature_maps || [];
    const classified = described.classified_output || "probabilities";  // an imported model's scores keep their name
    const header = {
      inputs: [{ name: "image", datatype: "BYTES", shape: [1, 1], parameters: { binary_data_size: image.length + 4 } }],
      outputs: [{ name: classified, parameters: { classification: 5, binary_data: false } }].concat(
        maps.map((name) => ({ name, parameters: { binary_data: true, datatype: fp16 ? "FP16" : "FP32" } }))),
    };
    const json = new TextEncoder().encode(JSON.stringify(header));
    const body = new Uint8Array(json.length + 4 + image.length);
    body.set(json, 0);
    new DataView(body.buffer).setUint32(json.length, image.length, true);
    body.set(image, json.length + 4);
    const started = performance.now();
    const response = await call("/v2/models/" + encodeURIComponent(model) + "/infer", {
      method: "POST",
      headers: { "Inference-Header-Content-Length": String(json.length), "Content-Type": "application/octet-stream" },
      body,
    });
    const raw = new Uint8Array(await response.arrayBuffer());
    const length = Number(response.headers.get("Inference-Header-Content-Length") || raw.length);
    const answer = JSON.parse(new TextDecoder().decode(raw.subarray(0, length)));
    let offset = length;
    const tensors = {};
    for (const output of answer.outputs) {
      const size = output.parameters && output.parameters.binary_data_size;
      if (size !== undefined) {
        tensors[output.name] = { shape: output.shape, data: decode(raw.slice(offset, offset + size), output.datatype) };
        offset += size;
      } else {
        tensors[output.name] = { shape: output.shape, data: output.data };
      }
    }
    const elapsed = performance.now() - started;
    await showSeen(model, image);
    showAnswer(tensors[classified].data, answer.parameters, elapsed, raw.length, described);
    await showLayers(model, described, maps, tensors);
    $("status").textContent = "done: " + raw.length.toLocaleString() + " bytes in " + elapsed.toFixed(0) + " ms";
  } catch (error) {
    $("status").textContent = "";
    clearAnswer();
    showError(String(error.message || error));
  }
}

function decode(bytes, datatype) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (datatype === "FP16") {
    const out = new Float32Array(bytes.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = half(view.getUint16(2 * i, true));
    return out;
  }
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

function half(h) {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
}

function showAnswer(top, parameters, elapsed, bytes, described) {
  const bars = $("bars");
  bars.innerHTML = "";
  for (const item of top) {
    const [score, index, label] = String(item).split(":");
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label !== undefined ? label : index;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = Math.max(1, 300 * Number(score)) + "px";
    const value = document.createElement("span");
    value.textContent = (100 * Number(score)).toFixed(1) + " %";
    row.append(name, fill, value);
    bars.appendChild(row);
  }
  const rows = [
    ["batch", parameters.batch_size],
    ["queue", parameters.queue_us + " µs"],
    ["compute", parameters.compute_us + " µs"],
    ["server total", parameters.server_us + " µs"],
    ["round trip", elapsed.toFixed(1) + " ms, " + bytes.toLocaleString() + " bytes"],
    ["execution provider", parameters.execution_provider],
    ["version", described.version + " (" + (described.precision || "fp32").toUpperCase() + ")"],
  ];
  $("metrics").innerHTML = "";
  for (const [key, value] of rows) {
    const tr = $("metrics").insertRow();
    tr.insertCell().textContent = key;
    tr.insertCell().textContent = value;
  }
  $("answer").hidden = false;
}

// ---- the conv layers -----------------------------------------------------------------------------

async function showLayers(model, described, maps, tensors) {
  const section = $("layers");
  section.innerHTML = "";
  const layers = described.layers || [];
  for (const name of maps) {
    const tensor = tensors[name];
    if (!tensor) continue;
    const block = document.createElement("div");
    block.className = "layer";
    block.dataset.layer = name;
    const title = document.createElement("h3");
    title.textContent = name + "  " + JSON.stringify(tensor.shape.slice(1));
    block.appendChild(title);
    const row = layers.find((l) => l.name === name);
    if (row) block.appendChild(arithmetic(row));
    block.appendChild(grid(tensor));
    section.appendChild(block);
    try {
      const filters = await (await call("/convserve/v1/models/" + encodeURIComponent(model) + "/filters/" + name)).json();
      block.appendChild(filterGrid(filters));
    } catch (error) {
      const note = document.createElement("p");
      note.textContent = "filters: " + error.message;
      block.appendChild(note);
    }
  }
}

function arithmetic(row) {
  const p = document.createElement("p");
  p.className = "arith";
  const [c, h, w] = row.input_shape, out = row.output_shape;
  let text = row.op + " " + (row.detail || "") + ": " + JSON.stringify(row.input_shape) + " → " + JSON.stringify(out) +
    ", " + Number(row.params).toLocaleString() + " parameters";
  const match = /^(\d+)x(\d+)\/(\d+)(?: pad (\d+))?/.exec(row.detail || "");
  if (match) {
    const k = Number(match[1]), s = Number(match[3]), pad = Number(match[4] || 0);
    text += "; floor((W + 2P − K)/S) + 1 = floor((" + w + " + 2·" + pad + " − " + k + ")/" + s + ") + 1 = " +
      (Math.floor((w + 2 * pad - k) / s) + 1);
  }
  if (row.receptive_field) text += "; receptive field " + row.receptive_field.join("×");
  if (row.jump) text += ", jump " + row.jump.join("×");
  p.textContent = text;
  return p;
}

const TILE_PX = 48;

function grid(tensor) {
  const [, channels, height, width] = tensor.shape;
  const box = document.createElement("div");
  box.className = "grid";
  // every layer's tiles at least TILE_PX on their longer side: conv1's large maps are never drawn smaller
  // than a deeper layer's small ones
  const scale = Math.max(TILE_PX, Math.max(height, width)) / Math.max(height, width);
  for (let c = 0; c < channels; c++) {
    const plane = tensor.data.subarray(c * height * width, (c + 1) * height * width);
    let min = Infinity, max = -Infinity;
    for (const v of plane) { if (v < min) min = v; if (v > max) max = v; }
    const canvas = tile(plane, width, height, min, max, scale);
    canvas.title = "channel " + c + ", " + height + "×" + width + ", min " + min.toPrecision(3) + ", max " + max.toPrecision(3);
    box.appendChild(canvas);
  }
  return box;
}

function tile(plane, width, height, min, max, scale, rgb) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = Math.round(width * scale) + "px";
  canvas.style.height = Math.round(height * scale) + "px";
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  const range = max - min || 1;
  for (let i = 0; i < width * height; i++) {
    for (let k = 0; k < 3; k++) {
      const v = rgb ? rgb[k][i] : plane[i];
      image.data[4 * i + k] = Math.round(255 * (v - min) / range);
    }
    image.data[4 * i + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

function filterGrid(filters) {
  const [out, inputs, kh, kw] = filters.shape;
  const bytes = Uint8Array.from(atob(filters.weights || ""), (ch) => ch.charCodeAt(0));
  const weights = decode(bytes, "FP32");
  const box = document.createElement("div");
  box.className = "grid filters";
  const scale = Math.max(2, Math.floor(24 / Math.max(kh, kw)));
  for (let o = 0; o < out; o++) {
    const base = o * inputs * kh * kw;
    const planes = [];
    for (let i = 0; i < inputs; i++) planes.push(weights.subarray(base + i * kh * kw, base + (i + 1) * kh * kw));
    let min = Infinity, max = -Infinity;
    for (const plane of planes) for (const v of plane) { if (v < min) min = v; if (v > max) max = v; }
    let canvas;
    if (inputs === 3) {
      canvas = tile(null, kw, kh, min, max, scale, planes); // the first layer's kernels in colour
    } else {
      const mean = new Float32Array(kh * kw);
      for (const plane of planes) plane.forEach((v, j) => { mean[j] += v / inputs; });
      let lo = Infinity, hi = -Infinity;
      for (const v of mean) { if (v < lo) lo = v; if (v > hi) hi = v; }
      canvas = tile(mean, kw, kh, lo, hi, scale);
    }
    canvas.title = "filter " + o + ", " + inputs + "×" + kh + "×" + kw;
    box.appendChild(canvas);
  }
  const wrap = document.createElement("div");
  const label = document.createElement("p");
  label.textContent = filters.layer + ": " + out + " filters of " + inputs + "×" + kh + "×" + kw +
    (inputs === 3 ? " (in colour)" : " (mean over input channels)");
  wrap.append(label, box);
  return wrap;
}

// ---- the drawing pad: dark strokes on white paper, sent as a PNG when the pen lifts -------------------

function drawingPad() {
  const pad = $("pad");
  const context = pad.getContext("2d");
  const blank = () => { context.fillStyle = "#fff"; context.fillRect(0, 0, pad.width, pad.height); };
  blank();
  let last = null;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    pad.setPointerCapture(event.pointerId);
    last = at(event);
  });
  pad.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = at(event);
    context.strokeStyle = "#000";
    context.lineWidth = 12;
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    context.moveTo(last[0], last[1]);
    context.lineTo(point[0], point[1]);
    context.stroke();
    last = point;
  });
  const lift = () => {
    if (!last) return;
    last = null;
    pad.toBlob(async (blob) => classify(new Uint8Array(await blob.arrayBuffer())), "image/png");
  };
  pad.addEventListener("pointerup", lift);
  pad.addEventListener("pointercancel", lift);
  $("clear").addEventListener("click", blank);
}

// ---- wiring ----------------------------------------------------------------------------------------

async function fromFile(file) {
  if (!file) return;
  classify(new Uint8Array(await file.arrayBuffer()));
}

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", modelChanged);
  drawingPad();
  $("file").addEventListener("change", (event) => fromFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    fromFile(event.dataTransfer.files[0]);
  });
  loadModels().catch((error) => showError(String(error.message || error)));
});
