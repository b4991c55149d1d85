// node scripts/browser-run.mjs URL [URL ...]: open each page URL (the page of `dgport web`, with
// autorun=1) in headless Chromium and print what it writes into #result, one JSON line per URL.
// node scripts/browser-run.mjs --api URL REQUESTS.json: load the page once, then run each request
// (generate.mjs's format) through the page's window.dgport.generator, timing each call in the page.
// CHROME names the browser (default /usr/bin/chromium); TIMEOUT_MS bounds each page (default 120000).

import { readFileSync } from "node:fs";

import puppeteer from "puppeteer-core";

const api = process.argv[2] === "--api";
const urls = process.argv.slice(api ? 3 : 2);
if (!urls.length || (api && urls.length !== 2)) {
  console.error("usage: node scripts/browser-run.mjs URL [URL ...] | --api URL REQUESTS.json");
  process.exit(2);
}
const timeout = Number(process.env.TIMEOUT_MS || 120000);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROME || "/usr/bin/chromium",
  headless: true,
  // no sandbox: CI runs as root; the rest keeps Chromium off the network (this machine has none)
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});

async function viaApi(url, requests) {
  const page = await browser.newPage();
  await page.goto(url, { waitUntil: "load", timeout });
  await page.waitForFunction(() => globalThis.dgport || document.getElementById("result")?.textContent.trim(), { timeout });
  for (const r of requests) {
    const out = await page.evaluate(async (r) => {
      if (!globalThis.dgport) return { error: document.getElementById("result").textContent };
      const started = performance.now();
      const res = await globalThis.dgport.generator.generate(r.prompt, { seed: r.seed, maxNewTokens: r.max_new_tokens ?? null,
        raw: r.raw ?? false, template: r.template ?? null, sampler: r.sampler ?? {} });
      return { token_ids: res.tokenIds, text: res.text, seed: res.seed, steps_per_canvas: res.stepsPerCanvas,
               finished: res.finished, holes: res.holes, seconds: (performance.now() - started) / 1000 };
    }, r);
    console.log(JSON.stringify(out));
  }
}

try {
  if (api) await viaApi(urls[0], JSON.parse(readFileSync(urls[1], "utf-8")));
  for (const url of api ? [] : urls) {
    const page = await browser.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(url, { waitUntil: "load", timeout });
    try {
      await page.waitForFunction(() => document.getElementById("result")?.textContent.trim(), { timeout, polling: 100 });
    } catch (e) {
      console.log(JSON.stringify({ error: `no result within ${timeout} ms`, logs }));
      await page.close();
      continue;
    }
    const text = await page.$eval("#result", (el) => el.textContent);
    const isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
    console.log(JSON.stringify({ ...JSON.parse(text), crossOriginIsolated: isolated, logs }));
    await page.close();
  }
} finally {
  await browser.close();
}
