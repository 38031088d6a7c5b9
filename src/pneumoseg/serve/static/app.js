// pneumoseg page: upload X-rays to /api/predict, draw the mask over each image, re-threshold the
// returned probability map in the browser (no new forward pass), download mask/overlay/CSV.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { items: [], tuned: true, tunedThreshold: 0.5 };

function showThreshold(value) {
  $("#threshold").value = value;
  $("#threshold-value").textContent = Number(value).toFixed(2);
}

function setMessage(text, bad = false) {
  const el = $("#message");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

async function loadHealth() {
  const el = $("#model-status");
  try {
    const h = await (await fetch("/health")).json();
    if (h.model_loaded) {
      el.textContent = `Model: ${h.experiment} (${h.models} model(s), TTA ${h.tta.join("+") || "none"}, ${h.device}) · pneumoseg ${h.version}`;
    } else {
      el.textContent = `No model loaded: ${h.problem || "train an experiment first"}`;
      el.classList.add("bad");
    }
  } catch (e) {
    el.textContent = "The server does not answer.";
    el.classList.add("bad");
  }
}

function pngToGray(b64) {
  // base64 PNG -> {w, h, data: Uint8ClampedArray of one channel}
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.width;
      c.height = img.height;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
      const gray = new Uint8ClampedArray(c.width * c.height);
      for (let i = 0; i < gray.length; i++) gray[i] = rgba[4 * i];
      resolve({ w: c.width, h: c.height, data: gray });
    };
    img.onerror = () => reject(new Error("bad PNG"));
    img.src = "data:image/png;base64," + b64;
  });
}

function components(mask, w, h, prob) {
  // 8-connected components: [{x, y, w, h, area, score}] (score = mean probability)
  const label = new Int32Array(w * h);
  const out = [];
  const stack = [];
  let next = 0;
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || label[start]) continue;
    next += 1;
    let x0 = w, y0 = h, x1 = -1, y1 = -1, area = 0, sum = 0;
    label[start] = next;
    stack.push(start);
    while (stack.length) {
      const i = stack.pop();
      const x = i % w, y = (i - x) / w;
      area += 1;
      sum += prob[i] / 255;
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx, ny = y + dy;
          if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
          const j = ny * w + nx;
          if (mask[j] && !label[j]) { label[j] = next; stack.push(j); }
        }
      }
    }
    out.push({ x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1, area, score: sum / area });
  }
  return out;
}

function rleRelative(mask, w, h) {
  // Kaggle's relative RLE over the column-major flattening ("-1" when empty)
  const parts = [];
  let prevEnd = 0, runStart = -1, k = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++, k++) {
      const on = mask[y * w + x] > 0;
      if (on && runStart < 0) runStart = k;
      if (!on && runStart >= 0) {
        parts.push(runStart - prevEnd, k - runStart);
        prevEnd = k;
        runStart = -1;
      }
    }
  }
  if (runStart >= 0) parts.push(runStart - prevEnd, k - runStart);
  return parts.length ? parts.join(" ") : "-1";
}

function currentMask(item) {
  if (state.tuned) return item.tunedMask;
  const t = Math.round(parseFloat($("#threshold").value) * 255);
  const m = new Uint8Array(item.w * item.h);
  for (let i = 0; i < m.length; i++) m[i] = item.prob[i] > t ? 1 : 0;
  return m;
}

function render(item) {
  const { w, h } = item;
  const mask = currentMask(item);
  const alpha = parseFloat($("#opacity").value);
  const canvas = item.card.querySelector("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const px = img.data;
  for (let i = 0; i < w * h; i++) {
    let r = item.gray[i], g = r, b = r;
    if (mask[i]) {
      const x = i % w, y = (i - x) / w;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
      if (edge) { r = 255; g = 40; b = 40; }
      else { r = r * (1 - alpha) + 255 * alpha; g = g * (1 - alpha) + 40 * alpha; b = b * (1 - alpha) + 40 * alpha; }
    }
    px[4 * i] = r; px[4 * i + 1] = g; px[4 * i + 2] = b; px[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  const comps = components(mask, w, h, item.prob);
  const line = Math.max(1, Math.round(w / 512));
  ctx.strokeStyle = "#ffdc00";
  ctx.fillStyle = "#ffdc00";
  ctx.lineWidth = line;
  ctx.font = `${Math.max(10, Math.round(w / 40))}px sans-serif`;
  for (const c of comps) {
    ctx.strokeRect(c.x + 0.5, c.y + 0.5, c.w - 1, c.h - 1);
    ctx.fillText(c.score.toFixed(2), c.x, Math.max(12, c.y - 4));
  }
  const area = mask.reduce((a, v) => a + v, 0);
  const positive = area > 0;
  const dec = item.card.querySelector(".decision");
  dec.textContent = positive ? "pneumothorax" : "no pneumothorax";
  dec.classList.toggle("positive", positive);
  item.card.querySelector(".area").textContent = `${area.toLocaleString()} px (${(100 * area / (w * h)).toFixed(2)}%)`;
  item.card.querySelector(".components").textContent = comps.length
    ? comps.map((c) => `${c.score.toFixed(2)} @ [${c.x}, ${c.y}, ${c.w}, ${c.h}]`).join("; ")
    : "none";
  item.rle = state.tuned ? item.result.rle : rleRelative(mask, w, h);
  item.card.dataset.area = String(area);
  item.card.querySelector(".dl-overlay").href = canvas.toDataURL("image/png");
  item.card.querySelector(".dl-mask").href = maskUrl(mask, w, h);
  item.card.querySelector(".dl-row").href = csvUrl([[item.result.id, item.rle]]);
}

function maskUrl(mask, w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const v = mask[i] ? 255 : 0;
    img.data[4 * i] = v; img.data[4 * i + 1] = v; img.data[4 * i + 2] = v; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c.toDataURL("image/png");
}

function csvUrl(rows) {
  // csvText (csv.js): every cell quoted, formula-like cells neutralised
  const text = csvText(["ImageId", "EncodedPixels"], rows);
  return URL.createObjectURL(new Blob([text], { type: "text/csv" }));
}

function renderAll() {
  for (const item of state.items) render(item);
  $("#csv").disabled = state.items.length === 0;
}

async function addResult(file, result) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = `${file ? file.name : result.id}`;
  $("#results").appendChild(card);
  if (result.error) {
    card.classList.add("failed");
    card.querySelector(".decision").textContent = `not predicted: ${result.error.detail}`;
    card.querySelector(".downloads").remove();
    card.querySelector("canvas").remove();
    return;
  }
  const [gray, prob, mask] = await Promise.all(
    [result.image_png, result.prob_png, result.mask_png].map(pngToGray));
  const tunedMask = new Uint8Array(mask.data.length);
  for (let i = 0; i < tunedMask.length; i++) tunedMask[i] = mask.data[i] > 127 ? 1 : 0;
  card.querySelector(".probability").textContent = result.probability.toFixed(3);
  const base = (result.id || "image").replace(/[^A-Za-z0-9._-]/g, "_");
  card.querySelector(".dl-mask").download = `${base}_mask.png`;
  card.querySelector(".dl-overlay").download = `${base}_overlay.png`;
  card.querySelector(".dl-row").download = `${base}.csv`;
  const seg = card.querySelector(".dl-seg");
  if (result.seg_dcm) {  // the tuned mask as a DICOM SEG, for a viewer or PACS
    seg.href = `data:application/dicom;base64,${result.seg_dcm}`;
    seg.download = `${base}.seg.dcm`;
  } else {
    seg.replaceWith(Object.assign(document.createElement("span"),
      { className: "seg-note", textContent: result.seg_note || "no DICOM SEG" }));
  }
  const item = { card, result, w: gray.w, h: gray.h, gray: gray.data, prob: prob.data, tunedMask };
  state.items.push(item);
  render(item);
  card.dataset.ready = "1";
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  setMessage(`Predicting ${files.length} image(s)…`);
  let response, body;
  try {
    response = await fetch("/api/predict?outputs=image,prob,mask,seg", { method: "POST", body: form });
    body = await response.json();
  } catch (e) {
    setMessage("The server did not answer: try again.", true);
    return;
  }
  const results = body.results || [];
  if (!response.ok && !results.length) {
    setMessage(body.detail || `Error ${response.status}`, true);
    return;
  }
  for (let i = 0; i < results.length; i++) await addResult(files[i], results[i]);
  const first = results.find((r) => r.threshold !== undefined);
  if (first) state.tunedThreshold = first.threshold;
  if (first && state.tuned) showThreshold(first.threshold);
  const failed = results.filter((r) => r.error).length;
  setMessage(failed ? `${results.length - failed} predicted, ${failed} refused (see the cards).`
    : `${results.length} image(s) predicted.`, !response.ok);
  $("#csv").disabled = state.items.length === 0;
}

function init() {
  loadHealth();
  const drop = $("#drop");
  $("#files").addEventListener("change", (e) => upload([...e.target.files]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload([...e.dataTransfer.files]);
  });
  $("#threshold").addEventListener("input", (e) => {
    state.tuned = false;
    $("#threshold-value").textContent = Number(e.target.value).toFixed(2);
    renderAll();
  });
  $("#opacity").addEventListener("input", (e) => {
    $("#opacity-value").textContent = Number(e.target.value).toFixed(2);
    renderAll();
  });
  $("#reset").addEventListener("click", () => {
    state.tuned = true;
    showThreshold(state.tunedThreshold);
    renderAll();
  });
  $("#csv").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = csvUrl(state.items.map((it) => [it.result.id, it.rle]));
    a.download = "submission.csv";
    a.click();
  });
}

init();
