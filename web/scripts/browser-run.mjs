// node scripts/browser-run.mjs URL [URL ...]: open each page URL (the page of `dgport web`, with
// autorun=1) in headless Chromium and print what it writes into #result, one JSON line per URL.
// CHROME names the browser (default /usr/bin/chromium); TIMEOUT_MS bounds each page (default 120000).

import puppeteer from "puppeteer-core";

const urls = process.argv.slice(2);
if (!urls.length) {
  console.error("usage: node scripts/browser-run.mjs URL [URL ...]");
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
try {
  for (const url of urls) {
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
