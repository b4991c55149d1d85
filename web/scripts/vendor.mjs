// npm run vendor: copy what the page needs from node_modules into vendor/, so that `dgport web` serves
// it from a pip install with no npm (the wasm gzipped; dgport web sends it with Content-Encoding: gzip).

import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const root = new URL("..", import.meta.url).pathname;
const nm = `${root}node_modules/`;
const out = `${root}vendor/`;
mkdirSync(out, { recursive: true });

export const FILES = {
  "ort.wasm.bundle.min.mjs": "onnxruntime-web/dist/ort.wasm.bundle.min.mjs",
  "ort-wasm-simd-threaded.wasm.gz": "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
  "tokenizers.min.mjs": "@huggingface/tokenizers/dist/tokenizers.min.mjs",
  "jinja.mjs": "@huggingface/jinja/dist/index.js",
};

for (const [name, src] of Object.entries(FILES)) {
  if (name.endsWith(".gz")) writeFileSync(out + name, gzipSync(readFileSync(nm + src), { level: 9 }));
  else copyFileSync(nm + src, out + name);
}
const versions = {};
for (const pkg of ["onnxruntime-web", "@huggingface/tokenizers", "@huggingface/jinja"]) {
  const meta = JSON.parse(readFileSync(`${nm}${pkg}/package.json`, "utf-8"));
  versions[pkg] = { version: meta.version, license: meta.license };
}
writeFileSync(out + "versions.json", JSON.stringify({ files: FILES, packages: versions }, null, 2) + "\n");
// the onnxruntime-web package carries no LICENSE file; this is onnxruntime's (MIT)
writeFileSync(`${out}LICENSE.onnxruntime-web`, `MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
`);
copyFileSync(`${nm}@huggingface/tokenizers/LICENSE`, `${out}LICENSE.tokenizers`);
copyFileSync(`${nm}@huggingface/jinja/LICENSE`, `${out}LICENSE.jinja`);
console.log(`vendor/: ${Object.keys(FILES).join(", ")}`);
