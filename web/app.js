// The page: load an export served beside it, generate with the JavaScript step loop, show the canvas
// as it denoises. URL parameters: model (the export's URL, default model/), prompt, seed, autorun=1,
// template=1 (Sudoku: fix the givens), max_new_tokens, threads.

import * as ort from "onnxruntime-web";

import { loadExportFromUrl } from "./src/browser.js";
import { answerTemplate, checkAnswer, normalize } from "./src/sudoku.js";
import { CanvasView, GridEditor } from "./view.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { gen: null, task: {}, running: false, stop: false };

// A task between steps, so the page repaints while the loop runs on this thread.
const channel = new MessageChannel();
const nextTask = () => new Promise((resolve) => { channel.port1.onmessage = resolve; channel.port2.postMessage(null); });

function setResult(value) {
  $("result").textContent = JSON.stringify(value);
}

function fail(message) {
  $("status").textContent = message;
  $("status").className = "bad";
  setResult({ error: message });
}

function threadCount() {
  const asked = Number(params.get("threads"));
  if (Number.isInteger(asked) && asked > 0) return asked;
  return globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
}

async function load() {
  ort.env.wasm.wasmPaths = { wasm: new URL("vendor/ort-wasm-simd-threaded.wasm", location.href).href };
  ort.env.wasm.numThreads = threadCount();
  const base = new URL(params.get("model") || "model/", location.href);
  if (base.origin !== location.origin) throw new Error("model= must name an export on this page's own server");
  const { manifest, task, generator } = await loadExportFromUrl(base, ort, {
    onProgress: (file, got, total) => { $("model-info").textContent = `Loading ${file}: ${(got / 1e6).toFixed(1)}${total ? ` of ${(total / 1e6).toFixed(1)}` : ""} MB`; },
  });
  state.gen = generator;
  state.task = task;
  const c = manifest.config;
  $("model-info").textContent = `${task.task === "sudoku" ? "Sudoku model" : "Model"}: ${manifest.dtype}, canvas ${c.canvas_length}, ` +
    `vocabulary ${c.vocab_size}, ${manifest.generation.max_denoising_steps} steps at most; onnxruntime-web ${ort.env.versions.web}, ` +
    `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads === 1 ? "" : "s"}${globalThis.crossOriginIsolated ? "" : " (no COOP/COEP headers: one thread)"}`;
}

function setUpInputs() {
  const sudoku = state.task.task === "sudoku";
  $("sudoku-input").hidden = !sudoku;
  $("text-input").hidden = sudoku;
  state.canvas = new CanvasView($("canvas"), (id) => state.gen.tokenizer.decode([id], { skipSpecialTokens: false }), sudoku);
  if (sudoku) {
    state.grid = new GridEditor($("grid-editor"));
    const examples = state.task.check_prompts || [];
    let next = 0;
    $("example").onclick = () => { if (examples.length) state.grid.value = examples[next++ % examples.length]; };
    $("clear").onclick = () => { state.grid.value = ""; };
    state.grid.value = normalize(params.get("prompt") || examples[0] || "");
    $("fix-givens").checked = params.get("template") === "1";
  } else {
    $("prompt").value = params.get("prompt") || "";
    $("max-new").value = params.get("max_new_tokens") || state.gen.defaults.max_new_tokens;
  }
  if (params.has("seed")) $("seed").value = params.get("seed");
}

function readPrompt() {
  if (state.task.task === "sudoku") return params.get("autorun") === "1" && params.has("prompt") && !state.edited ? params.get("prompt") : state.grid.value;
  return $("prompt").value;
}

function seedValue() {
  const text = $("seed").value.trim();
  if (!text) return null;
  if (!/^[0-9]+$/.test(text)) throw new Error("the seed is a whole number from 0 to 2**63 - 1");
  const seed = BigInt(text);
  return seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(seed) : seed;
}

async function run() {
  if (state.running) return;
  state.running = true;
  state.stop = false;
  $("run").disabled = true;
  $("stop").disabled = false;
  $("verdict").textContent = "";
  $("answer").textContent = "";
  $("status").className = "";
  setResult(null);
  $("result").textContent = "";
  const sudoku = state.task.task === "sudoku";
  const prompt = readPrompt();
  const times = [];
  let last = 0;
  try {
    const options = { seed: seedValue(), shouldStop: async () => { await nextTask(); last = performance.now(); return state.stop; } };
    if (sudoku && $("fix-givens").checked) options.template = answerTemplate(prompt);
    if (!sudoku && $("max-new").value) options.maxNewTokens = Number($("max-new").value);
    options.onStep = (e) => {
      times.push(performance.now() - last);
      state.canvas.show(e.canvas, (i) => (e.fixed && e.fixed[i] ? "fixed" : e.accepted[i] ? "accepted" : "renoised"));
      $("status").textContent = `canvas ${e.canvasIndex + 1}, step ${e.step + 1} · T = ${e.temperature.toFixed(3)} · ${times[times.length - 1].toFixed(1)} ms`;
    };
    options.onCanvas = (e) => state.canvas.show(e.tokens, (i) => (e.fixed && e.fixed[i] ? "fixed" : "committed"));
    const started = performance.now();
    const res = await state.gen.generate(prompt, options);
    const seconds = (performance.now() - started) / 1000;
    const steps = res.stepsPerCanvas.reduce((a, b) => a + b, 0);
    const ms = times.length ? times.reduce((a, b) => a + b, 0) / times.length : 0;
    $("answer").textContent = res.text;
    $("status").textContent = `${res.stopped ? "Stopped: " : ""}${res.tokenIds.length} tokens, ${steps} steps (${res.stepsPerCanvas.join(", ")} per canvas) ` +
      `in ${seconds.toFixed(2)} s, ${ms.toFixed(1)} ms a step · seed ${res.seed}`;
    if (sudoku && !res.stopped) {
      const verdict = checkAnswer(prompt, res.text);
      $("verdict").textContent = `sudoku: ${verdict.summary}`;
      $("verdict").className = verdict.ok ? "ok" : "bad";
    }
    setResult({ token_ids: res.tokenIds, text: res.text, seed: res.seed, steps_per_canvas: res.stepsPerCanvas,
                finished: res.finished, stopped: res.stopped, ms_per_step: ms, seconds });
  } catch (e) {
    fail(e.message);
  } finally {
    state.running = false;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

async function main() {
  try {
    await load();
  } catch (e) {
    $("model-info").textContent = "";
    fail(e.message);
    return;
  }
  setUpInputs();
  globalThis.dgport = { generator: state.gen, task: state.task }; // for scripts and the DevTools console
  $("form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
  $("stop").onclick = () => { state.stop = true; };
  $("grid-editor").addEventListener("input", () => { state.edited = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") state.stop = true; });
  $("run").disabled = false;
  if (params.get("autorun") === "1") await run();
}

main();
